"""What the built distribution ships: the PEP 561 marker, so type checkers read the
package's inline hints instead of reporting it as untyped."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_the_py_typed_marker(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    # Only tracked-looking files: no caches, no build leftovers.
    shutil.copytree(ROOT / "scalable_shampoo", source / "scalable_shampoo",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    build = ("import setuptools.build_meta as backend, sys; "
             "print(backend.build_wheel(sys.argv[1]))")
    wheel = subprocess.run([sys.executable, "-c", build, str(tmp_path / "dist")],
                           cwd=source, capture_output=True, text=True, check=True)
    name = wheel.stdout.strip().splitlines()[-1]
    files = zipfile.ZipFile(tmp_path / "dist" / name).namelist()
    assert "scalable_shampoo/py.typed" in files


def test_the_docs_users_see_are_self_contained():
    """Docstrings and help texts refer to no document outside the package (there was a
    SPEC.md that users never get)."""
    offenders = [f"{path.relative_to(ROOT)}:{number}"
                 for path in sorted((ROOT / "scalable_shampoo").rglob("*.py"))
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if "SPEC" in line]
    assert offenders == []
