"""README's install commands and CI: the user's install has no test extra, CI runs README's test
command as written, and constraints.txt pins every dependency pyproject.toml names (issue 26)."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    """The lines of README's first code block."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block is not None
    return block[1].splitlines()


def test_readme_has_a_venv_line_a_user_install_and_a_test_command():
    venv, user, tests = readme_commands()
    assert venv.startswith("python -m venv ")
    assert "pip install torch==2.13.0 && pip install -e . && llava chat" in user
    assert "[test]" not in user
    assert (
        tests
        == "pip install torch==2.13.0 && pip install -c constraints.txt -e '.[test]' && python -m pytest -q -n 2 --dist loadfile"
    )


def test_ci_runs_exactly_readmes_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci_lines[-1] == readme_commands()[2]
    assert "python3 -m venv .venv" in ci_lines


def requirement_name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_constraints_pin_every_dependency_and_the_cpu_torch():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    named = {requirement_name(r) for r in pyproject["dependencies"]}
    named |= {
        requirement_name(r)
        for extra in pyproject["optional-dependencies"].values()
        for r in extra
        if not r.startswith("llava-cli")
    }
    lines = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")]
    pins = dict(line.split("==", 1) for line in lines)
    assert all(re.fullmatch(r"[0-9][0-9A-Za-z.]*", version) for version in pins.values()), (
        "only plain versions: no URLs, no local builds"
    )
    assert named <= {name.lower().replace("_", "-") for name in pins}
    assert (pins["torch"], pins["bitsandbytes"], pins["kernels"]) == ("2.13.0", "0.50.2", "0.19.1")
