"""The repo's promises to a newcomer: CI runs exactly the README's test command and tests the
copyable files on the torch their first lines name, and the code's imports run one way
(commands, then the measuring code, the trainer's parts, the models)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    return re.findall(
        r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.DOTALL
    )


def test_readme_opens_with_install_and_test_commands():
    first, second = readme_commands()[:2]
    assert first.startswith("pip install -r requirements.txt && ")
    assert second.startswith("pip install -r requirements-dev.txt && ")


def test_ci_runs_the_readme_test_command():
    test_command = readme_commands()[1].split(" && ", 1)[1]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == test_command
    assert "pip install --quiet -r requirements-dev.txt" in ci


def test_copyable_files_name_the_floor_ci_tests_them_on():
    """Each copyable file's "Needs torch >= X.Y (tested on X.Y.Z and ...)" line names the
    torch that requirements-floor.txt pins, and CI installs that file."""
    floor = (ROOT / "requirements-floor.txt").read_text()
    (pinned,) = re.findall(r"^torch==(\S+)", floor, re.MULTILINE)
    for name in ("densenet.py", "diracnet.py", "sharedstats.py"):
        lines = re.findall(r"Needs torch >= (\d+\.\d+) \(tested on (\S+) and \S+\)\.",
                           (ROOT / name).read_text())  # fmt: skip
        assert lines == [(pinned.rsplit(".", 1)[0], pinned)], name
    ci = (ROOT / ".ci" / "run").read_text()
    assert '"$floor/bin/python" -m pip install --quiet -r requirements-floor.txt' in ci


def test_work_folder_is_ignored():
    assert "/work/*" in (ROOT / ".gitignore").read_text().splitlines()


# What each part of the code may import of the project: the commands use every part, the
# measuring code uses the trainer's parts, the trainer's parts use the copyable models.
COMMANDS = {"train", "bench", "plot", "make_graph"}
MODELS = {"densenet", "diracnet", "sharedstats"}
MAY_IMPORT = {
    "densenet": set(),
    "diracnet": set(),
    "sharedstats": {"densenet"},
    "hubconf": {"densenet"},
    "training": {"training", *MODELS},
    "benchmarks": {"benchmarks", "training", *MODELS},
    "attic": {"benchmarks", "training", *MODELS},
    "command": {"benchmarks", "training", *MODELS},
}


def project_imports(path: Path) -> set[str]:
    """The project's modules a file imports ("training.engine", "densenet", ...)."""
    tops = {p.stem for p in ROOT.glob("*.py")} | {"training", "benchmarks"}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            package = node.module in ("training", "benchmarks")
            names = [f"{node.module}.{a.name}" for a in node.names] if package else [node.module]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in tops}
    return found


def test_imports_run_one_way():
    """Commands -> benchmarks -> training -> the copyable models, never back: no module
    outside tests imports a command, and the trainer's parts import each other without a
    circle."""
    files = [*ROOT.glob("*.py"), *ROOT.glob("training/*.py"), *ROOT.glob("benchmarks/*.py"),
             *ROOT.glob("attic/*.py")]  # fmt: skip
    graph = {}
    for path in files:
        part = path.parent.name if path.parent != ROOT else path.stem
        rule = MAY_IMPORT.get(part, MAY_IMPORT["command"])
        imported = project_imports(path)
        wrong = {m for m in imported if m.split(".")[0] not in rule}
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"
        if part == "training":
            graph[f"training.{path.stem}"] = {m for m in imported if m.startswith("training.")}
    assert set().union(*graph.values()) <= set(graph)
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import circle: {' -> '.join((*path, module))}"
        if module not in done:
            for other in graph[module]:
                visit(other, (*path, module))
            done.add(module)

    for module in graph:
        visit(module, ())
