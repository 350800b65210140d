"""The README's two commands are what CI runs, word for word."""

import pathlib
import re

ROOT = pathlib.Path(__file__).parent.parent


def readme_commands():
    return re.findall(r"```bash\n\s*(.+?)\n\s*```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_commands():
    setup, tests = readme_commands()
    install = setup.split(" && .venv/bin/python examples/")[0]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install in ci and tests in ci
    assert setup.startswith("python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && ")
