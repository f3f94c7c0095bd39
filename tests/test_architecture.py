"""The floors of docs/architecture.md, enforced: `lint-imports` checks the contracts in pyproject.toml."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vqgpt", "stage1_vq", "stage2_prior")

# One import per contract that breaks it (module file -> line appended); never executed, only parsed.
VIOLATIONS = {
    "vqgpt/training/loop.py": "import stage1_vq.model",  # the training floor importing a stage
    "vqgpt/workflow/evaluation.py": "import vqgpt.cli",  # something other than __main__ importing the CLI
    "stage2_prior/draw.py": "import stage2_prior.highres",  # the token-level module importing a loop
    "stage1_vq/modules.py": "import stage1_vq.model",  # a cycle inside a stage (model imports modules)
}
# Each of these alone breaks the layers contract: a floor importing a higher one, or a stage the other.
LAYER_VIOLATIONS = {
    "vqgpt/ground/images.py": "import vqgpt.training.loop",
    "vqgpt/training/optim.py": "import vqgpt.workflow.pipeline",
    "stage1_vq/losses.py": "import vqgpt.workflow.pipeline",
    "stage2_prior/model.py": "import stage1_vq.model",
    "vqgpt/workflow/chain.py": "import vqgpt.cli.demo",
}


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    """Run import-linter on the packages under cwd with the contracts of cwd/pyproject.toml."""
    exe = Path(sys.executable).with_name("lint-imports")
    exe = str(exe) if exe.exists() else shutil.which("lint-imports")
    assert exe, "lint-imports not found: install the test extra (pip install -e '.[test]')"
    # The root packages are imported from cwd; --no-cache leaves no cache folder behind.
    return subprocess.run([exe, "--no-cache", "--no-logo"], cwd=cwd, capture_output=True, text=True, timeout=120)


def contract_names() -> list[str]:
    """The contract names declared in pyproject.toml (read as text: tomllib needs Python 3.11)."""
    section = (ROOT / "pyproject.toml").read_text().partition("[tool.importlinter]")[2]
    return re.findall(r'^name = "([^"]+)"$', section, re.M)


def test_import_contracts_are_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in contract_names():
        assert re.search(rf"^{re.escape(name)} KEPT$", result.stdout, re.M), f"{name!r} was not checked"


def test_each_contract_catches_a_forbidden_import(tmp_path):
    # A copy of the packages with one offending import per contract: every contract must break.
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for path, line in VIOLATIONS.items():
        with open(tmp_path / path, "a") as f:
            f.write(f"\n{line}  # deliberate violation\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout + result.stderr
    names = contract_names()
    assert len(names) == len(VIOLATIONS)
    for name in names:
        assert re.search(rf"^{re.escape(name)} BROKEN$", result.stdout, re.M), f"{name!r} kept:\n{result.stdout}"


def test_the_layers_contract_catches_each_upward_import(tmp_path):
    names = contract_names()
    layers = next(n for n in names if n.startswith("imports point down the floors"))
    for i, (path, line) in enumerate(LAYER_VIOLATIONS.items()):
        copy = tmp_path / str(i)
        for package in PACKAGES:
            shutil.copytree(ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
        with open(copy / path, "a") as f:
            f.write(f"\n{line}  # deliberate violation\n")
        result = lint_imports(copy)
        assert re.search(rf"^{re.escape(layers)} BROKEN$", result.stdout, re.M), f"{path}: {line} kept:\n{result.stdout}"
