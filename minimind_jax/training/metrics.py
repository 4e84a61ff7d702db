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

from minimind_jax.config import ModelConfig, param_count

# Dense bf16 peak TFLOP/s per device, for MFU (the figures the vendors publish, without sparsity).
GPU_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "A10": 125.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,
    "T4": 65.0,
}


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 x the parameters a token multiplies with (the active
    ones for MoE; the embedding lookup is free, a tied embedding counts once as the output head) plus the
    attention scores and values, 12 x layers x (heads x head_dim) x seq_len (PaLM's accounting)."""
    _, active = param_count(config)
    lookup = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6.0 * (active - lookup) + attention


def peak_tflops_per_device(measure_cpu: bool = True, dtype: str = "float32") -> float | None:
    """A known GPU's peak, or (CPU) a quick measurement of a large jitted matmul; None if unknown."""
    dev = jax.devices()[0]
    if dev.platform == "gpu":
        kind = dev.device_kind
        for name, tflops in GPU_PEAK_TFLOPS.items():
            if name in kind:
                return tflops
        return None
    if dev.platform == "cpu" and measure_cpu:
        return measure_matmul_tflops(dtype)
    return None


def measure_matmul_tflops(dtype: str = "float32", n: int = 1024, repeats: int = 8) -> float:
    """TFLOP/s of a jitted (n x n) @ (n x n) matmul on the default device (bf16 inputs accumulate in fp32)."""
    import time

    import jax.numpy as jnp

    dt = jnp.dtype(dtype)
    a = jnp.ones((n, n), dt)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


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
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # an optional nicety: the jsonl has everything
                SummaryWriter = None
            if SummaryWriter is not None:
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
    try:
        import numpy as np

        if isinstance(v, (np.ndarray, np.generic)) or hasattr(v, "dtype"):
            v = np.asarray(v).item()
    except Exception:
        pass
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


def plot_loss(metrics_path: str | os.PathLike, out_png: str | os.PathLike, title: str = "") -> Path | None:
    """Draw loss (and lr) against step from ``metrics.jsonl``; a resumed run's rows replace the overlapping
    ones. Returns the PNG's path, or None without matplotlib or data."""
    rows = read_metrics(metrics_path)
    by_step = {}
    for r in rows:
        if isinstance(r.get("loss"), (int, float)):
            by_step[r["step"]] = r
    if not by_step:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = sorted(by_step)
    losses = [by_step[s]["loss"] for s in steps]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8)
    window = max(1, len(steps) // 30)  # a running mean over ~1/30 of the run
    if window > 1:
        import numpy as np

        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, color="tab:blue", label=f"loss (mean of {window})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if any("lr" in by_step[s] for s in steps):
        ax2 = ax.twinx()
        ax2.plot(steps, [by_step[s].get("lr", float("nan")) for s in steps], color="tab:orange", alpha=0.6,
                 label="lr")
        ax2.set_ylabel("learning rate")
    ax.set_title(title or "training loss")
    fig.tight_layout()
    out = Path(out_png)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out
