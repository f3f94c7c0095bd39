from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = [l.strip() for l in (ROOT / ".ci/run").read_text().splitlines()]
    command = next(l for l in ci_lines if l.startswith("python3 -m venv"))
    assert "pytest" in command
    assert command in (ROOT / "README.md").read_text(), "README's test command and .ci/run differ"


def test_readme_config_reference_is_current():
    from vqgpt.cli import config_reference_text

    readme = (ROOT / "README.md").read_text()
    section = readme.split("<!-- config-reference:start -->\n", 1)[1].split("<!-- config-reference:end -->", 1)[0]
    assert section == config_reference_text(), "README config reference is stale: run `vqgpt config-reference`"


def test_readme_demo_command_installs_and_runs_the_demo():
    readme = (ROOT / "README.md").read_text()
    assert "pip install -q -e . && vqgpt demo --out runs/demo" in readme
