"""A built wheel (a normal, non-editable install) carries every package of the source tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP_PACKAGES = ("vqgpt", "stage1_vq", "stage2_prior")
# What a build must not see: local environments, build leftovers and run outputs.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__",
                                    ".pytest_cache", "runs", "outputs", "*.pyc")


def source_packages() -> set[str]:
    """Dotted names of every folder with an __init__.py under the top-level packages."""
    return {".".join(init.parent.relative_to(ROOT).parts)
            for top in TOP_PACKAGES for init in (ROOT / top).rglob("__init__.py")
            if "__pycache__" not in init.parts}


def test_wheel_contains_every_package(tmp_path):
    # Build from a copy, so the build's own build/ and egg-info never touch (or reuse) the checkout.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    out = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(src)], check=True, capture_output=True, text=True)
    (wheel,) = out.glob("vqgpt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    in_wheel = {name.rsplit("/", 1)[0].replace("/", ".") for name in names if name.endswith("/__init__.py")}
    expected = source_packages()
    assert {"vqgpt", "vqgpt.workflow.importers", "stage1_vq", "stage2_prior"} <= expected
    assert expected - in_wheel == set(), "packages missing from the wheel"
    # Every module file of those packages, not just the __init__.py.
    modules = {str(p.relative_to(ROOT)).replace("\\", "/") for top in TOP_PACKAGES for p in (ROOT / top).rglob("*.py")
               if "__pycache__" not in p.parts}
    assert modules - set(names) == set()
    assert any(name.endswith("entry_points.txt") for name in names)
