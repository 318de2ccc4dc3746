"""The repo's promises to a newcomer: CI runs exactly the README's test command."""

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


def test_work_folder_is_ignored():
    assert "/work/*" in (ROOT / ".gitignore").read_text().splitlines()
