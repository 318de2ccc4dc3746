"""The repo's promises to a newcomer: CI runs exactly the README's test command, and tests
the copyable files on the torch their first lines name."""

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
