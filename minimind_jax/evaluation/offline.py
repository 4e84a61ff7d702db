"""The offline multiple-choice tasks shipped in ``tasks/`` (C-Eval-, CMMLU- and ARC-style, on local jsonl) and
one call that evaluates a checkpoint on them, or on any task lm-eval knows, with the ``minimind-jax`` model."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

__all__ = ["TASK_DIR", "available_tasks", "evaluate", "task_configs"]

TASK_DIR = Path(__file__).resolve().parent / "tasks"


def available_tasks() -> list[str]:
    return sorted(p.stem for p in TASK_DIR.glob("*.yaml"))


def task_configs(names: list[str], data_dir: str | os.PathLike | None = None) -> list[dict | str]:
    """lm-eval task configs: a shipped task's YAML as a dict (its jsonl read from ``data_dir`` when given), a
    path to a YAML task file as a dict, any other name as itself (a task lm-eval knows, e.g. ``arc_easy``)."""
    out = []
    for name in names:
        if name.endswith((".yaml", ".yml")):
            if not os.path.isfile(name):
                raise FileNotFoundError(f"--tasks: no such task file: {name}")
            out.append(_read(Path(name), None))
        elif (TASK_DIR / f"{name}.yaml").is_file():
            out.append(_read(TASK_DIR / f"{name}.yaml", data_dir))
        else:
            out.append(name)
    return out


def _read(path: Path, data_dir) -> dict:
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(config, dict) or "task" not in config:
        raise ValueError(f"{path}: a task file needs a mapping with a 'task' key")
    files = config.get("dataset_kwargs", {}).get("data_files", {})
    for split, file in files.items():
        file = os.path.join(data_dir, os.path.basename(file)) if data_dir is not None else file
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{path}: the {split} data {file} does not exist (see --task-data)")
        files[split] = os.path.abspath(file)
    return config


def evaluate(model, tasks: list[str], *, data_dir=None, limit: int | None = None, num_fewshot: int | None = None,
             apply_chat_template: bool = False, log_samples: bool = False) -> dict:
    """lm-eval's ``simple_evaluate`` of ``model`` (an lm-eval LM, e.g. :class:`MiniMindJaxLM`) on ``tasks``;
    an unknown task name raises ValueError naming it and the shipped tasks."""
    import lm_eval  # optional dependency (the eval extra); imports torch

    from lm_eval.tasks import TaskManager

    configs = task_configs(tasks, data_dir)
    names = [t for t in configs if isinstance(t, str)]
    # indexing lm-eval's thousands of task files takes seconds: only when a task is named by lm-eval's name
    manager = TaskManager(include_defaults=bool(names))
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown task {', '.join(unknown)}: not a shipped task ({', '.join(available_tasks())}), "
                         "a .yaml task file, or a task lm-eval knows")
    return lm_eval.simple_evaluate(model=model, tasks=configs, limit=limit, num_fewshot=num_fewshot,
                                   apply_chat_template=apply_chat_template, log_samples=log_samples,
                                   task_manager=manager)
