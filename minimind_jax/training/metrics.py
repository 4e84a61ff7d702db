"""Run metrics: jsonl and TensorBoard event files, model FLOPs, and the loss-curve PNG.

``metrics.jsonl`` holds one JSON object per step (``step``, ``loss``, ``aux_loss``, ``lr``,
``grad_norm``, ``loss_scale``, ``skipped``, ``tokens_per_s``, ``tflops_per_device``, ``mfu`` ...); a resumed run
appends to it. ``tb/`` holds the same scalars for TensorBoard (``tensorboard --logdir out``). ``loss.png`` is
drawn from the jsonl at the end of every run, so it covers resumed runs too.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure
from tensorboardX import SummaryWriter

from minimind_jax.config import ModelConfig, param_count
from minimind_jax.precision import Policy


def log(msg: str) -> None:
    """A run's message, printed once (by process 0 of a multi-process run)."""
    if jax.process_index() == 0:
        print(msg, flush=True)


# Dense peak TFLOP/s per device as the vendors publish them (no sparsity), by device_kind substring (first
# match wins: A100 before A10, L40S before L4), per dtype the matmuls run in: "float32" is the fp32 policy
# (dots at precision HIGHEST: CUDA cores, no TF32), "tf32" the tf32 policy's tensor cores, bfloat16 / float16
# the tensor cores. H100 / H200 are the SXM figures.
PEAK_TFLOPS = {
    "H200": {"float32": 67.0, "tf32": 494.7, "bfloat16": 989.4, "float16": 989.4},
    "H100": {"float32": 67.0, "tf32": 494.7, "bfloat16": 989.4, "float16": 989.4},
    "A100": {"float32": 19.5, "tf32": 156.0, "bfloat16": 312.0, "float16": 312.0},
    "L40S": {"float32": 91.6, "tf32": 183.0, "bfloat16": 362.0, "float16": 362.0},
    "L4": {"float32": 30.3, "tf32": 60.0, "bfloat16": 121.0, "float16": 121.0},
    "A10": {"float32": 31.2, "tf32": 62.5, "bfloat16": 125.0, "float16": 125.0},
    "V100": {"float32": 15.7, "float16": 125.0},
}


def matmul_dtype(policy: Policy) -> str:
    """The PEAK_TFLOPS column a policy's matmuls run at."""
    if policy.name == "tf32":
        return "tf32"
    return jnp.dtype(policy.compute_dtype).name


def stated_peak(policy: Policy, setting: float | None = None) -> tuple[float | None, str]:
    """(peak TFLOP/s per device for MFU, where it comes from): ``setting`` if given, else the table's figure
    for device 0's kind and the policy's matmul dtype; (None, why) when there is none (CPUs, unknown GPUs)."""
    if setting:
        return float(setting), f"{setting:g} TFLOP/s per device (peak_tflops setting)"
    dev = jax.devices()[0]
    dtype = matmul_dtype(policy)
    for name, peaks in PEAK_TFLOPS.items():
        if dev.platform == "gpu" and name in dev.device_kind:
            if dtype in peaks:
                return peaks[dtype], f"{peaks[dtype]:g} TFLOP/s per device ({name} dense {dtype}, published)"
            break
    return None, f"off (no stated {dtype} peak for {dev.device_kind}; set peak_tflops to report MFU)"


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 x the parameters a token multiplies with (the active
    ones for MoE; the embedding lookup is free, a tied embedding counts once as the output head) plus the
    attention scores and values, 12 x layers x (heads x head_dim) x seq_len (PaLM's accounting)."""
    _, active = param_count(config)
    lookup = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6.0 * (active - lookup) + attention


class MetricsLogger:
    """Appends step metrics to ``metrics.jsonl`` and TensorBoard (process 0 only)."""

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = True, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / "metrics.jsonl"
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            self._tb = SummaryWriter(str(self.run_dir / "tb"))

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in values.items():
            row[k] = _plain(v)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _plain(v):
    if isinstance(v, (np.ndarray, np.generic)) or hasattr(v, "dtype"):
        v = np.asarray(v).item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(path: str | os.PathLike) -> list[dict]:
    rows = []
    p = Path(path)
    if not p.is_file():
        return rows
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill -9: the rest is still good
                continue
    return rows


def plot_loss(metrics_path: str | os.PathLike, out_png: str | os.PathLike, title: str = "",
              key: str = "loss") -> Path | None:
    """Draw ``key`` (the loss, with the lr; or e.g. an RL run's ``reward_mean``) against step from
    ``metrics.jsonl``; a resumed run's rows replace the overlapping ones. Returns the PNG's path, or None when
    no row has ``key``."""
    rows = read_metrics(metrics_path)
    by_step = {}
    for r in rows:
        if isinstance(r.get(key), (int, float)):
            by_step[r["step"]] = r
    if not by_step:
        return None
    steps = sorted(by_step)
    losses = [by_step[s][key] for s in steps]
    fig = Figure(figsize=(7, 4), dpi=110)  # no pyplot: no GUI backend, no global figure registry
    ax = fig.subplots()
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8)
    window = max(1, len(steps) // 30)  # a running mean over ~1/30 of the run
    if window > 1:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, color="tab:blue", label=f"{key} (mean of {window})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    if key == "loss" and any("lr" in by_step[s] for s in steps):
        ax2 = ax.twinx()
        ax2.plot(steps, [by_step[s].get("lr", float("nan")) for s in steps], color="tab:orange", alpha=0.6,
                 label="lr")
        ax2.set_ylabel("learning rate")
    ax.set_title(title or ("training loss" if key == "loss" else key))
    fig.tight_layout()
    out = Path(out_png)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, out)
    return out
