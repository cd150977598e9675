"""The installed package: its names live under ``bdpruning``, every public name is documented,
and a wheel built from the tree holds every package folder and imports every module."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers.material import ROOT


def test_installed_names_live_under_bdpruning():
    import bdpruning.convert
    import bdpruning.lightning_modules

    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('convert') is not None)"
    assert subprocess.run([sys.executable, "-c", code], cwd="/").returncode == 0


def test_every_public_name_is_documented():
    """The API reference is the docstrings: each public name says what it takes and returns."""
    import inspect

    import bdpruning

    undocumented = [name for name in bdpruning.__all__ if len(inspect.getdoc(getattr(bdpruning, name)) or "") < 20]
    assert undocumented == []


def test_old_public_names_still_work_for_one_release():
    import bdpruning
    from bdpruning.lightning_modules.data import H5DataModule, ImageDataModule
    from bdpruning.pruning.masks import pruned_layers, pruned_selection

    assert bdpruning.pruned_channels is bdpruning.zeroed_channels and "pruned_channels" in bdpruning.__all__
    assert H5DataModule is ImageDataModule and pruned_layers is pruned_selection


#: What the wheel is built from (the working tree's sources, copied: the build writes next to them).
SOURCES = ["pyproject.toml", "setup.py", "README.md", "bdpruning", "convert", "lightning_modules"]
NESTED = {"convert": "bdpruning/convert", "lightning_modules": "bdpruning/lightning_modules"}

IMPORT_ALL = """
import importlib, sys
from pathlib import Path
root = Path(sys.argv[1]).resolve()
import torch  # before TensorFlow, which some convert modules import
names = sorted(".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
               for p in root.joinpath("bdpruning").rglob("*.py"))
outside = [n for n in names if not Path(importlib.import_module(n).__file__).resolve().is_relative_to(root)]
print(len(names), outside)
"""


@pytest.mark.slow
def test_the_wheel_holds_every_package_and_imports_every_module_from_itself(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                            if (ROOT / name).is_dir() else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-index", "--no-deps", "--no-build-isolation",
                    "--quiet", "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("bdpruning-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        files = set(archive.namelist())
        archive.extractall(tmp_path / "installed")
    expected = set()
    for top in ("bdpruning", *NESTED):  # every package folder of the tree, where it installs
        for init in (ROOT / top).glob("**/__init__.py"):
            rest = init.relative_to(ROOT / top).as_posix()
            expected.add(f"{NESTED.get(top, top)}/{rest}")
    assert len(expected) >= 15 and expected <= files
    assert {name.split("/")[0] for name in files if ".dist-info/" not in name} == {"bdpruning"}  # no top-level convert
    result = subprocess.run([sys.executable, "-c", IMPORT_ALL, str(tmp_path / "installed")], capture_output=True,
                            text=True, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "installed"), "PATH": "/usr/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    count, outside = result.stdout.split(" ", 1)
    assert int(count) > 60 and outside.strip() == "[]"  # every module, each from the wheel
