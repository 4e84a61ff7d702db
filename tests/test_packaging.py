"""A non-editable install (``pip install .``) carries configs/: an installed package trains a stage with that
stage's defaults file, and a stage whose defaults file is missing is an error, not the dataclass defaults."""

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from minimind_jax.training import config as tconfig
from minimind_jax.training.config import TrainConfigError, resolve

ROOT = Path(__file__).resolve().parents[1]
# what the build reads: the package sources, configs/ and the files pyproject.toml names
SOURCES = ("pyproject.toml", "README.md", "minimind_jax", "convert", "configs")

PROBE = """
from minimind_jax.training import config as c
cfg = c.resolve(["--stage", "sft"])
print(c.__file__)
print(c.CONFIG_DIR)
print(cfg.learning_rate, cfg.accumulation_steps, cfg.max_seq_len)
"""


def _copy_sources(dst: Path) -> None:
    """The build runs in a copy: an in-tree build would leave build/ in the checkout (and race other tests)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    dst.mkdir()
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=ignore)
        else:
            shutil.copy2(src, dst / name)


def _can_build_wheels() -> bool:
    try:
        version = tuple(int(p) for p in importlib.metadata.version("setuptools").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return version >= (70, 1) or importlib.util.find_spec("wheel") is not None


def test_installed_package_reads_the_stage_defaults(tmp_path):
    src, env = tmp_path / "src", tmp_path / "venv"
    _copy_sources(src)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env)], check=True)
    # this interpreter's pip builds and installs into the venv's prefix; with its own setuptools when that can build
    # wheels by itself (>= 70.1, or with the wheel package), else in pip's isolated build environment
    no_isolation = ["--no-build-isolation"] if _can_build_wheels() else []
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *no_isolation,
                    "--prefix", str(env), str(src)], check=True, capture_output=True)
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing may point back at a checkout
    out = subprocess.run([str(env / "bin" / "python"), "-c", PROBE], cwd=tmp_path, check=True, capture_output=True,
                         text=True, env=clean).stdout.split("\n")
    module, config_dir, figures = out[0], Path(out[1]), out[2].split()
    assert Path(module).is_relative_to(env), module  # the installed copy, not this checkout
    assert config_dir.is_relative_to(env) and (config_dir / "models" / "minimind3.yaml").is_file()
    sft = yaml.safe_load((ROOT / "configs" / "sft.yaml").read_text())
    assert float(figures[0]) == pytest.approx(float(sft["learning_rate"]))
    assert int(figures[1]) == sft["accumulation_steps"] and int(figures[2]) == sft["max_seq_len"]
    assert float(figures[0]) != tconfig.TrainConfig().learning_rate  # the file, not the dataclass defaults


def test_missing_stage_defaults_file_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(tconfig, "CONFIG_DIR", tmp_path)
    with pytest.raises(TrainConfigError, match=r"stage sft: its defaults file .*sft\.yaml does not exist"):
        resolve(["--stage", "sft"])
