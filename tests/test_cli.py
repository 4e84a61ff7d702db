"""The console scripts (pyproject.toml [project.scripts], minimind_jax/cli.py): every entry names an importable
callable, the installed metadata lists the same entries, and a command runs its script with its arguments."""

import importlib
import importlib.metadata
import shutil
import subprocess
from pathlib import Path

import pytest

from minimind_jax import cli

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]


def _load(value: str):
    module, _, attr = value.partition(":")
    return getattr(importlib.import_module(module), attr)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_each_console_script_names_a_callable(name):
    assert callable(_load(SCRIPTS[name]))


def test_the_installed_metadata_lists_them():
    try:
        dist = importlib.metadata.distribution("minimind-jax")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("minimind-jax is not installed (pip install -e .)")
    installed = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert installed == SCRIPTS, "the installed entry points differ from pyproject.toml: pip install -e . again"
    assert all(callable(ep.load()) for ep in dist.entry_points if ep.group == "console_scripts")


def test_a_command_runs_its_script(capsys):
    # the script's own exit code and messages: eval.py with nothing to do
    assert cli.run_script("eval", ["--ckpt", "x"]) == 2
    assert "nothing to do" in capsys.readouterr().err
    exe = shutil.which("minimind-eval")
    try:
        importlib.metadata.distribution("minimind-jax")
    except importlib.metadata.PackageNotFoundError:
        exe = None  # a leftover shim (pyenv) of an uninstalled package is not the command
    if exe is None:
        pytest.skip("the minimind-eval command is not installed (pip install -e .)")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage: minimind-eval") and "--holdout" in out.stdout


def test_a_missing_script_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "SCRIPT_DIRS", (tmp_path,))
    assert cli.run_script("train", []) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: scripts/train.py not found in " + str(tmp_path)) and err.count("\n") == 1


def test_the_commands_are_the_scripts():
    assert {cli.script_path(n).name for n in ("train", "eval", "serve_openai_api", "chat", "generate")} == {
        "train.py", "eval.py", "serve_openai_api.py", "chat.py", "generate.py"}
    assert all(cli.script_path(n).parent == ROOT / "scripts" for n in ("train", "eval"))


def test_lm_eval_command_without_lm_eval_is_a_one_line_error(monkeypatch, capsys):
    from minimind_jax.evaluation import __main__ as lm_cli

    monkeypatch.setattr(lm_cli, "cli_evaluate", None)
    monkeypatch.setattr(lm_cli, "MISSING", ImportError("No module named 'lm_eval'"), raising=False)
    assert lm_cli.main() == 2
    err = capsys.readouterr().err
    assert err == "error: needs lm-evaluation-harness: pip install -e '.[eval]' (No module named 'lm_eval')\n"
