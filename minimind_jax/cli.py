"""The console scripts of pyproject.toml's ``[project.scripts]``: ``minimind-train``, ``minimind-eval``,
``minimind-serve``, ``minimind-chat`` and ``minimind-generate`` are ``python scripts/<name>.py`` under another name
(same flags, same exit codes); ``minimind-convert`` is ``convert.cli:main`` and ``minimind-lm-eval`` lm-eval's
command line with the ``minimind-jax`` model registered (``python -m minimind_jax.evaluation``).

The scripts' logic lives in their files only: each function here loads ``scripts/<name>.py`` and calls its
``main`` with the command's arguments. The files are read from the source checkout this package was installed
from (``pip install -e .``), else from ``<prefix>/share/minimind-jax/scripts`` (where a wheel would carry them as
data files); a missing file is a one-line error naming where it was looked for.
"""

from __future__ import annotations

import importlib.util
import sys
import sysconfig
from pathlib import Path

__all__ = ["chat", "evaluate", "generate", "run_script", "serve", "train"]

SCRIPT_DIRS = (Path(__file__).resolve().parents[1] / "scripts",
               Path(sysconfig.get_path("data")) / "share" / "minimind-jax" / "scripts")


def script_path(name: str) -> Path:
    """The file of ``scripts/<name>.py`` (the first of :data:`SCRIPT_DIRS` that has it)."""
    for folder in SCRIPT_DIRS:
        if (folder / f"{name}.py").is_file():
            return folder / f"{name}.py"
    raise FileNotFoundError(f"scripts/{name}.py not found in {' or '.join(map(str, SCRIPT_DIRS))}: the console "
                            "scripts run the scripts of a source checkout (pip install -e .)")


def run_script(name: str, argv: list[str] | None = None) -> int:
    """Run ``scripts/<name>.py``'s ``main(argv)`` (default: this command's arguments); its exit code."""
    try:
        path = script_path(name)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location(f"minimind_jax_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main(sys.argv[1:] if argv is None else argv)
    return 0 if code is None else int(code)


def train() -> int:
    """``minimind-train``: ``scripts/train.py`` (every training stage)."""
    return run_script("train")


def evaluate() -> int:
    """``minimind-eval``: ``scripts/eval.py`` (loss / perplexity, the prompt suite, lm-eval tasks)."""
    return run_script("eval")


def serve() -> int:
    """``minimind-serve``: ``scripts/serve_openai_api.py`` (the OpenAI-compatible server and chat page)."""
    return run_script("serve_openai_api")


def chat() -> int:
    """``minimind-chat``: ``scripts/chat.py`` (a chat in the terminal)."""
    return run_script("chat")


def generate() -> int:
    """``minimind-generate``: ``scripts/generate.py`` (continue or answer prompts)."""
    return run_script("generate")
