"""Generation over the preallocated KV cache: one jitted prefill, then a ``lax.while_loop`` decode.

:class:`Generator` holds the params on the device (cast once to the policy's param dtype) and runs
batches of prompts:

* **Prompts** are left-padded to a power-of-two bucket ``P``; the cache holds ``L = bucket(P + max_new)``
  slots, so the prefill compiles once per (batch, P, L) and the decode once per (batch, L), never once per
  prompt length. Each row's position ids count its real tokens only, and its padding slots are masked out
  of attention, so a left-padded row computes what it would alone.
* **Sampling** follows MiniMind's ``generate``: the logits of every token already in the row (prompt and
  generated) are divided by ``repetition_penalty``; greedy takes the argmax of those; sampling divides by
  ``temperature``, keeps the ``top_k`` best (0 = all) then the smallest prefix of the sorted distribution
  whose probability exceeds ``top_p`` (the token that crosses it stays), and draws from the rest. Every
  parameter is per row (a server batches requests with different settings), and every row draws from its
  own key ``fold_in(key(seed), step)``, so a row's sample does not depend on the rest of the batch.
* **Stopping**: a row stops after any of its eos ids or after its own token limit; the loop ends when all
  rows have stopped.
* **Streaming**: :meth:`Generator.stream` runs the same compiled decode a few steps at a time (``stop_at``
  is an argument, not a shape) and yields the new tokens after each call; :class:`TextStream` turns ids
  into text deltas without splitting a multi-byte character.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from minimind_jax import weights
from minimind_jax.config import ModelConfig
from minimind_jax.model.transformer import KVCache, MiniMindLM
from minimind_jax.precision import Policy, get_policy
from minimind_jax.tokenizer import load_tokenizer

__all__ = ["GenerationResult", "Generator", "SamplingParams", "TextStream", "bucket_length", "greedy_generate",
           "pick_tokens", "row_settings"]

_NO_TOKEN = -1  # written after a row has stopped
_MAX_EOS = 4


def bucket_length(n: int, minimum: int = 16) -> int:
    """Round up to a power of two so prompts of similar length share one compiled program."""
    return max(minimum, 1 << (int(n) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one row picks its next token (MiniMind's ``generate`` semantics; its eval defaults).

    ``greedy=True`` (or ``temperature == 0``) takes the argmax after the repetition penalty; ``top_k=0``
    and ``top_p=1`` switch those filters off.
    """

    temperature: float = 0.85
    top_p: float = 0.85
    top_k: int = 0
    repetition_penalty: float = 1.0
    greedy: bool = False
    seed: int = 0

    def __post_init__(self):
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not (self.repetition_penalty > 0 and np.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    @classmethod
    def make_greedy(cls, repetition_penalty: float = 1.0) -> SamplingParams:
        return cls(greedy=True, repetition_penalty=repetition_penalty)


@dataclasses.dataclass
class GenerationResult:
    """One row's new tokens (the stopping eos included) and why it stopped: ``"stop"`` (an eos id) or
    ``"length"`` (its token limit)."""

    tokens: list[int]
    finish_reason: str


@flax.struct.dataclass
class _Rows:
    """Per-row settings, as device arrays of shape (batch,)."""

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    penalty: jax.Array
    greedy: jax.Array
    keys: jax.Array  # typed PRNG keys
    limit: jax.Array  # max new tokens of the row
    eos: jax.Array  # (batch, _MAX_EOS) stop ids, -1 = none


def _make_rows(sampling: Sequence[SamplingParams], limits: Sequence[int], eos: Sequence[int]) -> _Rows:
    b = len(sampling)
    eos_arr = np.full((b, _MAX_EOS), -1, np.int32)
    eos_arr[:, : len(eos)] = list(eos)
    return _Rows(
        temperature=jnp.asarray([s.temperature for s in sampling], jnp.float32),
        top_p=jnp.asarray([s.top_p for s in sampling], jnp.float32),
        top_k=jnp.asarray([s.top_k for s in sampling], jnp.int32),
        penalty=jnp.asarray([s.repetition_penalty for s in sampling], jnp.float32),
        greedy=jnp.asarray([s.is_greedy for s in sampling]),
        keys=jax.vmap(jax.random.key)(jnp.asarray([s.seed for s in sampling], jnp.uint32)),
        limit=jnp.asarray(limits, jnp.int32),
        eos=jnp.asarray(eos_arr))


@flax.struct.dataclass
class _State:
    cache: KVCache
    kv_mask: jax.Array  # (b, L) int32: slots a query may attend to
    pos: jax.Array  # (b,) position id of the next token fed
    seen: jax.Array  # (b, vocab) bool: tokens in the row so far (repetition penalty)
    out: jax.Array  # (b, L) int32 new tokens, _NO_TOKEN after a row stopped
    step: jax.Array  # int32 scalar: tokens produced so far (per row, the same count)
    done: jax.Array  # (b,) bool


def _filter(logits: jax.Array, seen: jax.Array, rows: _Rows) -> tuple[jax.Array, jax.Array]:
    """MiniMind's logits processing of float32 logits (b, vocab): returns (the penalised logits, whose argmax is
    the greedy choice; the temperature-scaled logits with the top-k / top-p rejects at -inf, to sample from)."""
    b, v = logits.shape
    logits = jnp.where(seen, logits / rows.penalty[:, None], logits)
    scaled = logits / jnp.where(rows.greedy, 1.0, rows.temperature)[:, None]
    order_vals, order_idx = jax.lax.top_k(scaled, v)  # sorted descending
    kth = jnp.take_along_axis(order_vals, (jnp.clip(rows.top_k, 1, v) - 1)[:, None], axis=-1)
    kth = jnp.where(rows.top_k[:, None] > 0, kth, -jnp.inf)
    order_vals = jnp.where(order_vals < kth, -jnp.inf, order_vals)  # ties with the k-th stay, as in MiniMind
    cum = jnp.cumsum(jax.nn.softmax(order_vals, axis=-1), axis=-1)
    drop = cum > rows.top_p[:, None]
    drop = jnp.concatenate([jnp.zeros((b, 1), bool), drop[:, :-1]], axis=-1)  # keep the token that crosses
    drop = drop & (rows.top_p[:, None] < 1.0)
    order_vals = jnp.where(drop, -jnp.inf, order_vals)
    filtered = jnp.full_like(scaled, -jnp.inf).at[jnp.arange(b)[:, None], order_idx].set(order_vals)
    return logits, filtered


def _pick(logits: jax.Array, seen: jax.Array, rows: _Rows, step: jax.Array) -> jax.Array:
    """The next token of every row: greedy rows take the argmax, the others draw with key fold_in(row key, step)."""
    return pick_tokens(logits, seen, rows, jnp.broadcast_to(step, rows.greedy.shape))


def row_settings(sampling: Sequence[SamplingParams], limits: Sequence[int], eos: Sequence[int]) -> _Rows:
    """The per-row settings (device arrays of shape (rows,)) that :func:`pick_tokens` reads."""
    return _make_rows(sampling, limits, eos)


def pick_tokens(logits: jax.Array, seen: jax.Array, rows: _Rows, steps: jax.Array) -> jax.Array:
    """:func:`_pick` with a step counter per row (b,): row i draws with key fold_in(row key, steps[i]), so rows
    that started at different times (a server's decode slots) each keep the stream they would have alone."""
    def greedy_only(logits):  # no sort, no draw: the common case of a batch of greedy rows
        logits = jnp.where(seen, logits / rows.penalty[:, None], logits)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def mixed(logits):
        penalised, filtered = _filter(logits, seen, rows)
        step_keys = jax.vmap(jax.random.fold_in)(rows.keys, steps)
        sampled = jax.vmap(jax.random.categorical)(step_keys, filtered).astype(jnp.int32)
        return jnp.where(rows.greedy, jnp.argmax(penalised, axis=-1).astype(jnp.int32), sampled)

    return jax.lax.cond(jnp.all(rows.greedy), greedy_only, mixed, logits)


def _advance(state: _State, token: jax.Array, rows: _Rows) -> _State:
    """Record ``token`` (b,) as output number ``state.step`` of the rows that are still running."""
    token = jnp.where(state.done, _NO_TOKEN, token)
    b = token.shape[0]
    out = jax.lax.dynamic_update_slice(state.out, token[:, None], (0, state.step))
    seen = state.seen.at[jnp.arange(b), jnp.maximum(token, 0)].max(token >= 0)
    step = state.step + 1
    stopped = jnp.any(token[:, None] == rows.eos, axis=-1) | (step >= rows.limit)
    return state.replace(out=out, seen=seen, step=step, done=state.done | stopped)


@functools.partial(jax.jit, static_argnames=("config", "policy", "max_len"))
def _prefill(params, prompt, prompt_mask, rows: _Rows, *, config: ModelConfig, policy: Policy, max_len: int) -> _State:
    """Run the left-padded prompts (b, P) through the model, filling cache slots 0..P-1, and pick token 0."""
    model = MiniMindLM(config, policy)
    b, p = prompt.shape
    cache = KVCache.init(config, b, max_len, policy.compute_dtype)
    kv_mask = jnp.zeros((b, max_len), jnp.int32).at[:, :p].set(prompt_mask)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0).astype(jnp.int32)
    out = model.apply({"params": params}, prompt, attention_mask=kv_mask, position_ids=positions, cache=cache)
    seen = jnp.zeros((b, config.vocab_size), bool).at[jnp.arange(b)[:, None], prompt].max(prompt_mask.astype(bool))
    state = _State(cache=out.cache, kv_mask=kv_mask, pos=jnp.sum(prompt_mask, axis=-1).astype(jnp.int32), seen=seen,
                   out=jnp.full((b, max_len), _NO_TOKEN, jnp.int32), step=jnp.zeros((), jnp.int32),
                   done=jnp.zeros((b,), bool))
    token = _pick(out.logits[:, -1].astype(jnp.float32), seen, rows, state.step)
    return _advance(state, token, rows)


@functools.partial(jax.jit, static_argnames=("config", "policy"), donate_argnames=("state",))
def _decode(params, state: _State, rows: _Rows, stop_at, *, config: ModelConfig, policy: Policy) -> _State:
    """Decode until every row has stopped or ``state.step == stop_at``."""
    model = MiniMindLM(config, policy)
    b = state.out.shape[0]

    def cond(s: _State):
        return (s.step < stop_at) & ~jnp.all(s.done)

    def body(s: _State):
        last = jax.lax.dynamic_slice(s.out, (0, s.step - 1), (b, 1))
        last = jnp.maximum(last, 0)  # stopped rows feed a harmless token; their output is discarded
        slot = s.cache.index
        kv_mask = jax.lax.dynamic_update_slice(s.kv_mask, jnp.ones((b, 1), jnp.int32), (0, slot))
        out = model.apply({"params": params}, last, attention_mask=kv_mask, position_ids=s.pos[:, None],
                          cache=s.cache)
        s = s.replace(cache=out.cache, kv_mask=kv_mask, pos=s.pos + 1)
        return _advance(s, _pick(out.logits[:, -1].astype(jnp.float32), s.seen, rows, s.step), rows)

    return jax.lax.while_loop(cond, body, state)


class Generator:
    """Batched generation with one model's params, kept on the device in the policy's param dtype.

    >>> gen = Generator(params, config, policy="bf16-params")
    >>> gen.generate([[1, 2, 3], [4, 5]], max_new_tokens=32, sampling=SamplingParams(seed=7))
    """

    def __init__(self, params, config: ModelConfig, policy: Policy | str = "fp32", *,
                 eos_ids: Sequence[int] | None = None):
        self.config = config
        self.policy = get_policy(policy)
        self.params = jax.device_put(self.policy.cast_to_param(params))
        self.eos_ids = (config.eos_token_id,) if eos_ids is None else tuple(eos_ids)
        if len(self.eos_ids) > _MAX_EOS:
            raise ValueError(f"at most {_MAX_EOS} eos ids, got {len(self.eos_ids)}")

    @classmethod
    def from_checkpoint(cls, path: str, policy: Policy | str = "fp32", **kwargs) -> Generator:
        """A generator for this project's checkpoint directory or anything the converter reads."""
        config, params = weights.load(path)
        return cls(params, config, policy, **kwargs)

    # ------------------------------------------------------------------------------------------ set-up
    def _prepare(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                 sampling: SamplingParams | Sequence[SamplingParams] | None, eos_ids):
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts:
            raise ValueError("no prompts given")
        b = len(prompts)
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in p if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has ids outside the vocabulary (size {self.config.vocab_size}): {bad[:5]}")
        limits = [int(max_new_tokens)] * b if np.isscalar(max_new_tokens) else [int(m) for m in max_new_tokens]
        if len(limits) != b or min(limits) < 1:
            raise ValueError(f"max_new_tokens must be >= 1 for each of the {b} prompts, got {max_new_tokens}")
        if sampling is None or isinstance(sampling, SamplingParams):
            sampling = [sampling or SamplingParams.make_greedy()] * b
        if len(sampling) != b:
            raise ValueError(f"{len(sampling)} sampling settings for {b} prompts")
        eos = self.eos_ids if eos_ids is None else tuple(eos_ids)
        if len(eos) > _MAX_EOS:
            raise ValueError(f"at most {_MAX_EOS} eos ids, got {len(eos)}")
        p = bucket_length(max(len(x) for x in prompts))
        max_len = bucket_length(p + max(limits))
        longest = max(len(x) + m for x, m in zip(prompts, limits))
        if longest > self.config.max_position_embeddings:
            raise ValueError(f"a prompt plus its new tokens ({longest}) exceeds the model's "
                             f"max_position_embeddings ({self.config.max_position_embeddings})")
        ids = np.zeros((b, p), np.int32)
        mask = np.zeros((b, p), np.int32)
        for i, x in enumerate(prompts):
            ids[i, p - len(x):] = x
            mask[i, p - len(x):] = 1
        rows = _make_rows(sampling, limits, eos)
        return jnp.asarray(ids), jnp.asarray(mask), rows, max_len, max(limits), set(eos)

    @staticmethod
    def _results(tokens: Sequence[Sequence[int]], eos: set[int]) -> list[GenerationResult]:
        return [GenerationResult(list(t), "stop" if t and t[-1] in eos else "length") for t in tokens]

    # ------------------------------------------------------------------------------------------ running
    def _stream(self, ids, mask, rows: _Rows, max_len: int, steps: int, chunk: int) -> Iterator[list[list[int]]]:
        state = _prefill(self.params, ids, mask, rows, config=self.config, policy=self.policy, max_len=max_len)
        sent = 0
        while True:
            step = int(state.step)
            out = np.asarray(state.out[:, sent:step])
            yield [[int(t) for t in row if t != _NO_TOKEN] for row in out]
            sent = step
            if step >= steps or bool(jnp.all(state.done)):
                return
            state = _decode(self.params, state, rows, jnp.int32(min(step + chunk, steps)), config=self.config,
                            policy=self.policy)

    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int] = 64,
               sampling: SamplingParams | Sequence[SamplingParams] | None = None, *, eos_ids=None,
               chunk: int = 1) -> Iterator[list[list[int]]]:
        """Yield, after every ``chunk`` decode steps, each row's new tokens since the last yield (an empty list
        for a row with nothing new). The tokens of a row end with its eos id when it stops on one."""
        ids, mask, rows, max_len, steps, _ = self._prepare(prompts, max_new_tokens, sampling, eos_ids)
        return self._stream(ids, mask, rows, max_len, steps, chunk)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int] = 64,
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None, *, eos_ids=None,
                 callback: Callable[[list[list[int]]], Any] | None = None) -> list[GenerationResult]:
        """Generate for every prompt (lists of ids); greedy unless ``sampling`` says otherwise. With a
        ``callback``, it receives each step's new tokens as :meth:`stream` yields them."""
        ids, mask, rows, max_len, steps, eos = self._prepare(prompts, max_new_tokens, sampling, eos_ids)
        if callback is not None:
            collected = [[] for _ in prompts]
            for new in self._stream(ids, mask, rows, max_len, steps, chunk=1):
                callback(new)
                for acc, toks in zip(collected, new):
                    acc.extend(toks)
            return self._results(collected, eos)
        state = _prefill(self.params, ids, mask, rows, config=self.config, policy=self.policy, max_len=max_len)
        state = _decode(self.params, state, rows, jnp.int32(steps), config=self.config, policy=self.policy)
        return self._results([[int(t) for t in row if t != _NO_TOKEN] for row in np.asarray(state.out)], eos)


class TextStream:
    """Turns a growing list of ids into text deltas: decodes everything so far and returns what is new,
    holding back a trailing partial UTF-8 character (shown as U+FFFD) until its bytes are complete."""

    def __init__(self, tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\ufffd"):
            return ""
        delta, self.text = text[len(self.text):], text
        return delta

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        delta, self.text = text[len(self.text):], text
        return delta


def default_eos_ids(config: ModelConfig, tokenizer) -> list[int]:
    """The ids that end a reply: the model config's eos and the tokenizer's (they differ in some checkpoints)."""
    return sorted({config.eos_token_id} | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))


def greedy_generate(params, config: ModelConfig, prompt_ids, max_new_tokens: int = 32, *,
                    policy: Policy | str = "fp32", eos_id: int | None = None) -> list[int]:
    """Greedy continuation of one prompt (a list of ids): the new ids, stopping after ``eos_id``."""
    gen = Generator(params, config, policy, eos_ids=None if eos_id is None else (eos_id,))
    return gen.generate([list(prompt_ids)], max_new_tokens)[0].tokens


def tokenizer_for(path: str | None = None, tokenizer_dir: str | None = None):
    """The tokenizer to use with a checkpoint: ``tokenizer_dir`` if given, else the checkpoint's own (a
    directory holding ``tokenizer.json``, as the converter's ``--tokenizer`` writes), else the bundled one."""
    if tokenizer_dir:
        return load_tokenizer(tokenizer_dir)
    if path and os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json")):
        return load_tokenizer(path)
    return load_tokenizer()
