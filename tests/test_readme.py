from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = [l.strip() for l in (ROOT / ".ci/run").read_text().splitlines()]
    command = next(l for l in ci_lines if l.startswith("python3 -m venv"))
    assert "pytest" in command
    assert command in (ROOT / "README.md").read_text(), "README's test command and .ci/run differ"
