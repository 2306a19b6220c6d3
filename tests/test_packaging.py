"""What a user of the package sees (issue 11, item 5): `python -m derpnet` runs the CLI,
the licence file matches the declared licence, the metadata has author, classifiers and
URLs, and the built wheel carries `py.typed` for both packages and the LICENSE."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_python_m_derpnet_runs_the_cli():
    r = subprocess.run([sys.executable, "-m", "derpnet", "--version"], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("derpconnect (derpnet) ")
    r = subprocess.run([sys.executable, "-m", "derpnet"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("derpconnect: error: no command given")


def test_licence_file_matches_the_declared_licence():
    assert PROJECT["license"] == {"text": "BSD-3-Clause"}
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License")
    assert "Copyright (c) 2026, derpnet authors" in text
    assert "Neither the name of the copyright holder" in text  # the third clause
    assert "License :: OSI Approved :: BSD License" in PROJECT["classifiers"]


def test_metadata_names_authors_classifiers_and_urls():
    assert PROJECT["authors"] == [{"name": "derpnet authors"}]
    assert "Typing :: Typed" in PROJECT["classifiers"]
    assert any(c.startswith("Programming Language :: Python :: 3.") for c in PROJECT["classifiers"])
    assert all(u.startswith("https://") for u in PROJECT["urls"].values()) and PROJECT["urls"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel `pip wheel` builds from a copy of the tree (the build writes build/ next to it)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("derpnet", "derpquic"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (path,) = out.glob("derpnet-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_carries_py_typed_and_the_licence(wheel):
    names = set(wheel.namelist())
    assert {"derpnet/py.typed", "derpquic/py.typed", "derpnet/__main__.py", "derpnet/data/derpmap.json"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)
    (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    text = wheel.read(meta).decode()
    assert "Author: derpnet authors" in text
    assert "Classifier: Typing :: Typed" in text
    assert "Project-URL: " in text
