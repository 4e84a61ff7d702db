"""A reward model of our own: the MiniMind backbone plus a scalar head, trained on preference pairs
(``dpo.jsonl``: chosen / rejected) with the Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected)``, and used
by the RL stages as the ``reward_model`` reward, so the whole RLAIF pipeline runs offline.

* The score of a conversation is ``h . w + b`` at its last trained token (the end of the last assistant
  reply, as the SFT / DPO data mark it), ``h`` the backbone's final normed hidden state there.
* Params: ``{"model": <the LM's params>, "head": {"kernel": (hidden,), "bias": ()}}``; the head starts at zero
  (every score 0, loss ln 2).
* On disk (``save`` / ``load``): this project's checkpoint of the backbone, with the head in its manifest's
  ``extra`` (float32 values and their sha256, checked on load).
* :class:`RewardScorer` is a reward function ``fn(response, record)``: the record's ``messages`` plus the
  response as the assistant's reply, encoded as SFT data is, scored in one jitted forward pass per length
  bucket.
* :func:`open_reward_model` reads ``--reward_model DIR``: this kind (a ``manifest.json``) or a Hugging Face
  sequence-classification / reward model (a ``config.json``; :mod:`minimind_jax.rl.hf_reward`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from minimind_jax import weights
from minimind_jax.checkpoint import looks_like_checkpoint, read_manifest, save_checkpoint
from minimind_jax.config import ModelConfig
from minimind_jax.data.samples import IGNORE_INDEX, ChatMarkers, encode_sft
from minimind_jax.generate import bucket_length
from minimind_jax.model.transformer import MiniMindLM
from minimind_jax.precision import get_policy
from minimind_jax.rl import hf_reward

HEAD_KEY = "reward_head"


def init_head(hidden_size: int) -> dict:
    return {"kernel": np.zeros((hidden_size,), np.float32), "bias": np.zeros((), np.float32)}


def last_trained_index(labels: jax.Array) -> jax.Array:
    """The position of each row's last trained label (0 for a row with none). (B,) int32."""
    positions = jnp.arange(labels.shape[-1])
    return jnp.max(jnp.where(labels != IGNORE_INDEX, positions, 0), axis=-1).astype(jnp.int32)


def head_scores(hidden: jax.Array, labels: jax.Array, head) -> jax.Array:
    """The scalar score of each row from the final hidden states (B, T, H). (B,) float32."""
    idx = last_trained_index(labels)
    h = jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    return h @ head["kernel"].astype(jnp.float32) + head["bias"].astype(jnp.float32)


def make_loss():
    """The training loop's loss on a DPO micro-batch: the Bradley-Terry loss summed over the pairs."""

    def loss(apply, params, frozen, micro, rng):
        ids = jnp.concatenate([micro["chosen_input_ids"], micro["rejected_input_ids"]])
        labels = jnp.concatenate([micro["chosen_labels"], micro["rejected_labels"]])
        out = apply(params["model"], ids, rng, return_hidden=True)
        chosen, rejected = jnp.split(head_scores(out.hidden, labels, params["head"]), 2)
        margin = chosen - rejected
        metrics = {"reward_accuracy": jnp.mean((margin > 0).astype(jnp.float32)), "reward_margin": jnp.mean(margin),
                   "chosen_reward": jnp.mean(chosen), "rejected_reward": jnp.mean(rejected)}
        return jnp.sum(-jax.nn.log_sigmoid(margin)), out.aux_loss, metrics

    return loss


def _head_digest(kernel: np.ndarray, bias: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(kernel, np.float32).tobytes()
                          + np.asarray(bias, np.float32).tobytes()).hexdigest()


def save(out_dir: str | Path, params, config: ModelConfig, *, step: int = 0) -> Path:
    """The backbone as a checkpoint with the head in its manifest (atomic, like every checkpoint)."""
    kernel = np.asarray(params["head"]["kernel"], np.float32)
    bias = np.asarray(params["head"]["bias"], np.float32)
    extra = {HEAD_KEY: {"kernel": kernel.tolist(), "bias": float(bias), "sha256": _head_digest(kernel, bias)}}
    return save_checkpoint(out_dir, params["model"], config, source={"stage": "reward", "step": step}, extra=extra,
                           force=True)


def load(path: str | Path) -> tuple[ModelConfig, dict]:
    """``(config, {"model": backbone, "head": head})`` of a reward model written by :func:`save`."""
    config, backbone = weights.load(str(path), what="reward_model")
    try:
        head = read_manifest(path).get("extra", {})[HEAD_KEY]
        kernel = np.asarray(head["kernel"], np.float32)
        bias = np.asarray(head["bias"], np.float32)
    except (KeyError, TypeError, ValueError, OSError) as e:
        raise weights.WeightsError(f"reward_model {path}: no reward head in its manifest (not written by the "
                                   f"reward stage?): {e}") from None
    if kernel.shape != (config.hidden_size,) or _head_digest(kernel, bias) != head.get("sha256"):
        raise weights.WeightsError(f"reward_model {path}: the reward head is damaged (shape {kernel.shape} or "
                                   "checksum differs)")
    return config, {"model": backbone, "head": {"kernel": kernel, "bias": bias}}


class RewardScorer:
    """The ``reward_model`` reward: ``scorer(response, record) -> float`` for a record with ``messages``."""

    def __init__(self, path: str | Path, tokenizer, policy: str = "fp32", max_seq_len: int = 2048):
        self.config, self.params = load(path)
        self.tokenizer, self.max_seq_len = tokenizer, max_seq_len
        self.markers = ChatMarkers.from_tokenizer(tokenizer)
        model = MiniMindLM(self.config, get_policy(policy))

        @jax.jit
        def score(params, ids, labels):
            hidden = model.apply({"params": params["model"]}, ids, return_hidden=True).hidden
            return head_scores(hidden, labels, params["head"])

        self._score = score

    def __call__(self, response: str, record) -> float:
        return self.batch([response], [record])[0]

    def batch(self, responses, records) -> list[float]:
        """The scores of many responses in one forward pass (rows and length padded to powers of two, so a
        rollout batch compiles once per bucket pair); :func:`~minimind_jax.rl.rewards.score` calls it."""
        rows = [self._encode(r, rec) for r, rec in zip(responses, records, strict=True)]
        n = bucket_length(max(int(np.max(np.nonzero(labels != IGNORE_INDEX)[0], initial=0)) + 1
                              for _, labels in rows))
        b = bucket_length(len(rows), minimum=1)
        ids = np.stack([r[0][:n] for r in rows] + [rows[0][0][:n]] * (b - len(rows)))
        labels = np.stack([r[1][:n] for r in rows] + [rows[0][1][:n]] * (b - len(rows)))
        scores = np.asarray(self._score(self.params, jnp.asarray(ids), jnp.asarray(labels)))
        return [float(v) for v in scores[:len(rows)]]

    def _encode(self, response: str, record) -> tuple[np.ndarray, np.ndarray]:
        messages = [*record.get("messages", []), {"role": "assistant", "content": response}]
        enc = encode_sft({"conversations": messages}, self.tokenizer, self.max_seq_len, markers=self.markers)
        return enc.arrays["input_ids"], enc.arrays["labels"]


def open_reward_model(path: str | Path, tokenizer, policy: str = "fp32", max_seq_len: int = 2048):
    """The ``reward_model`` reward of ``--reward_model DIR``: a :class:`RewardScorer` for a reward model of ours
    (written by ``--stage reward``), a :class:`~minimind_jax.rl.hf_reward.HFRewardModel` for a Hugging Face
    directory (scored with its own tokenizer); anything else is one error naming the directory."""
    if hf_reward.is_hf_model_dir(path):
        return hf_reward.HFRewardModel(path, max_length=max_seq_len)
    if not Path(path).exists():
        raise weights.WeightsError(f"reward_model {path}: no such directory")
    if not looks_like_checkpoint(path):
        raise weights.WeightsError(f"reward_model {path}: neither a reward model written by --stage reward (a "
                                   "manifest.json) nor a Hugging Face sequence-classification model (a config.json)")
    return RewardScorer(path, tokenizer, policy, max_seq_len)
