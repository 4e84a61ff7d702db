"""Per-token log-probabilities of token sequences, batched on one jitted forward pass.

Sequences are right-padded to a power-of-two length bucket and the batch to a fixed number of rows, so the
forward pass compiles once per length bucket, never once per request. Causal attention means the right
padding cannot change the positions before it, so no attention mask is needed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from minimind_jax.config import ModelConfig
from minimind_jax.model.transformer import MiniMindLM
from minimind_jax.precision import Policy, get_policy

__all__ = ["Scorer", "TokenScores", "bucket"]

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for ``logprobs``; one compiled top-k for every request


def bucket(n: int, minimum: int = 16) -> int:
    """Round up to the next power of two or 1.5x a power of two (16, 24, 32, 48, 64, ...): sequences of similar
    length share one compiled program, and a batch is padded by at most a third."""
    n = max(int(n), minimum)
    power = 1 << (n - 1).bit_length()
    return power * 3 // 4 if n <= power * 3 // 4 else power


@functools.partial(jax.jit, static_argnames=("config", "policy", "top"))
def _score(params, ids, lengths, *, config: ModelConfig, policy: Policy, top: int):
    """For right-padded ids (b, T) of ``lengths`` (b,): log p(ids[:, t+1] | ids[:, :t+1]) (b, T-1), whether
    ids[:, t+1] is the argmax, the next-token log-probs after each whole row (b, vocab), and the ``top`` best
    (log-prob, id) pairs at each position (log-softmax in float32)."""
    logits = MiniMindLM(config, policy).apply({"params": params}, ids).logits.astype(jnp.float32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    target = ids[:, 1:]
    picked = jnp.take_along_axis(logprobs[:, :-1], target[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits[:, :-1], axis=-1) == target
    after = jnp.take_along_axis(logprobs, (lengths - 1)[:, None, None], axis=1)[:, 0]
    if not top:
        return picked, greedy, after, None, None
    top_vals, top_ids = jax.lax.top_k(logprobs[:, :-1], top)
    return picked, greedy, after, top_vals, top_ids


class TokenScores:
    """The scores of one sequence of n tokens: ``logprobs[i]`` / ``greedy[i]`` are about token i+1 (n-1 each);
    ``after`` is the next-token log-prob vector after the whole sequence (vocab); ``top[i]`` is the list of
    (id, log-prob) best alternatives at position i (empty without ``top``)."""

    def __init__(self, logprobs: np.ndarray, greedy: np.ndarray, after: np.ndarray,
                 top: list[list[tuple[int, float]]]):
        self.logprobs, self.greedy, self.after, self.top = logprobs, greedy, after, top


class Scorer:
    """Scores batches of token sequences with one model's params (kept on the device in the policy's dtype).

    >>> scorer = Scorer(params, config, "fp32", batch_size=8)
    >>> scorer.score([[1, 5, 9, 2], [1, 7]])[0].logprobs   # log p(5 | 1), log p(9 | 1 5), log p(2 | 1 5 9)
    >>> scorer.loglikelihoods([[1, 5, 9, 2]], [2])          # [(log p(9 | 1 5) + log p(2 | 1 5 9), is-greedy)]
    """

    def __init__(self, params, config: ModelConfig, policy: Policy | str = "fp32", *, batch_size: int = 8):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.config = config
        self.policy = get_policy(policy)
        self.params = jax.device_put(self.policy.cast_to_param(params))
        self.batch_size = int(batch_size)

    @property
    def max_length(self) -> int:
        return self.config.max_position_embeddings

    def _check(self, seqs: Sequence[Sequence[int]]) -> None:
        for i, s in enumerate(seqs):
            if not s:
                raise ValueError(f"sequence {i} is empty")
            if len(s) > self.max_length:
                raise ValueError(f"sequence {i} has {len(s)} tokens, more than the model's context "
                                 f"(max_position_embeddings {self.max_length})")
            if min(s) < 0 or max(s) >= self.config.vocab_size:
                raise ValueError(f"sequence {i} has ids outside the vocabulary (size {self.config.vocab_size})")

    def _run(self, seqs: list[list[int]], top: int) -> list[TokenScores]:
        width = min(bucket(max(map(len, seqs))), bucket(self.max_length))
        ids = np.zeros((self.batch_size, width), np.int32)
        lengths = np.ones((self.batch_size,), np.int32)
        for row, s in enumerate(seqs):
            ids[row, :len(s)] = s
            lengths[row] = len(s)
        picked, greedy, after, top_vals, top_ids = _score(self.params, jnp.asarray(ids), jnp.asarray(lengths),
                                                          config=self.config, policy=self.policy, top=top)
        picked, greedy, after = np.asarray(picked, np.float64), np.asarray(greedy), np.asarray(after, np.float64)
        if top:
            top_vals, top_ids = np.asarray(top_vals, np.float64), np.asarray(top_ids)
        out = []
        for row, s in enumerate(seqs):
            n = len(s) - 1
            alts = ([list(zip(top_ids[row, i].tolist(), top_vals[row, i].tolist())) for i in range(n)]
                    if top else [])
            out.append(TokenScores(picked[row, :n], greedy[row, :n], after[row], alts))
        return out

    def score(self, seqs: Sequence[Sequence[int]], top: int = 0, progress=None) -> list[TokenScores]:
        """Scores of every sequence (non-empty lists of ids), in order. Sequences are sorted by length so each batch
        is padded little; ``top`` (<= 20) adds the best alternatives; ``progress(n)`` is told of each batch."""
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top must be in [0, {MAX_TOP_LOGPROBS}], got {top}")
        seqs = [list(map(int, s)) for s in seqs]
        self._check(seqs)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        results: list[TokenScores | None] = [None] * len(seqs)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            for i, scores in zip(chunk, self._run([seqs[i] for i in chunk], top)):
                results[i] = scores
            if progress is not None:
                progress(len(chunk))
        return results

    def loglikelihoods(self, seqs: Sequence[Sequence[int]], counts: Sequence[int], progress=None
                       ) -> list[tuple[float, bool]]:
        """(sum of the log-probs of the last ``counts[i]`` tokens of ``seqs[i]``, whether each was the argmax).

        Sequences that differ only in their last token (the answers of a multiple-choice question) share one
        forward pass of their common prefix: the last token is read from the next-token distribution after it."""
        prefixes = sorted({tuple(s[:-1]) for s in seqs})
        index = {p: i for i, p in enumerate(prefixes)}
        scores = self.score([list(p) for p in prefixes], progress=progress)
        out = []
        for s, n in zip(seqs, counts):
            if not 1 <= n < len(s):
                raise ValueError(f"cannot score the last {n} of {len(s)} tokens (needs 1 <= n < length)")
            sc = scores[index[tuple(s[:-1])]]
            last = int(s[-1])
            logprob = float(sc.logprobs[len(s) - 1 - n:].sum()) + float(sc.after[last])
            greedy = bool(sc.greedy[len(s) - 1 - n:].all()) and int(np.argmax(sc.after)) == last
            out.append((logprob, greedy))
        return out
