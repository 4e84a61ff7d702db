"""Continuous batching: a fixed number of decode slots over one preallocated KV cache, and the thread that
keeps them busy.

:class:`SlotDecoder` is the device part. Its KV cache has ``slots`` rows of ``cache_len`` tokens, and every
slot has its own length (the next write column and position id), last token, seen-token set (repetition
penalty), step counter and sampling settings. :meth:`SlotDecoder.prefill_many` runs several prompts in one
call (right-padded to the longest's power-of-two bucket, their rows to a power-of-two count, so it compiles
once per (rows, bucket)) and writes their keys / values into free slots;
:meth:`SlotDecoder.step` decodes one token for every slot at once: the model is ``vmap``-ed over the
slots, so each slot writes its own column and attends to its own first ``length`` columns, whatever the
other slots hold. The step runs over slots 0..w-1, w the power of two above the highest slot in use (new
requests take the lowest free slot), so it compiles once per (w, cache_len) and a lightly loaded server
does not pay for its free slots; free slots below w are computed too, but their results are dropped and
their state does not move.

A prompt longer than ``chunk_tokens`` (512) is prefilled in chunks, one per decode step of the other slots
(:meth:`SlotDecoder.prefill_part`): a chunk attends only to the cache columns up to its own end (rounded up to
a power of two), so a long prompt's prefill needs memory linear in its length, and the chunks get shorter as
the prompt grows (at most ``chunk_scores`` query x column pairs, 512 x 2048), so running requests keep
streaming while it goes in, each step delayed by about the same chunk cost.

Sampling is :func:`~minimind_jax.generate.pick_tokens`: a slot's token ``i`` is drawn with the key
``fold_in(key(seed), i)``, the same stream :class:`~minimind_jax.generate.Generator` uses for a row, so a
request's tokens for a given seed do not depend on what else is being decoded, nor on when it joined.

:class:`Engine` is the scheduler: a bounded queue of :class:`Request` objects and one worker thread. Before
every decode step it frees the slots of cancelled and timed-out requests, then prefills the waiting requests
into the free slots, together in one call; after the step each request's token goes to its hooks
(:meth:`Request.on_token`), and a request that ends (an eos id, its token limit, a stop string its hook reports) frees its slot at
once, so the next waiting request joins at the next step.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from minimind_jax.config import ModelConfig
from minimind_jax.generate import GenerationResult, SamplingParams, bucket_length, pick_tokens, row_settings
from minimind_jax.model.transformer import KVCache, MiniMindLM
from minimind_jax.precision import Policy, get_policy

__all__ = ["Engine", "EngineError", "EngineRows", "Request", "RowStream", "SlotDecoder"]

log = logging.getLogger("minimind_jax.engine")

_RATE_WINDOW_S = 10.0  # tokens/s is measured over this recent window


# ------------------------------------------------------------------------------------------------ device part


@flax.struct.dataclass
class _Slots:
    k: jax.Array  # (layers, slots, cache_len, kv_heads, head_dim)
    v: jax.Array
    length: jax.Array  # (slots,) int32: tokens in the slot's cache = the next write column and position id
    last: jax.Array  # (slots,) int32: the token fed at the next step
    seen: jax.Array  # (slots, vocab) bool: tokens of the slot so far (repetition penalty)
    steps: jax.Array  # (slots,) int32: tokens generated so far (the sampling key's counter)
    rows: object  # generate's per-row settings, one row per slot


def _empty_slots(config: ModelConfig, slots: int, cache_len: int, dtype) -> _Slots:
    cache = KVCache.init(config, slots, cache_len, dtype)
    def zeros():  # separate buffers: the state is donated, and one buffer may not be donated twice
        return jnp.zeros((slots,), jnp.int32)

    return _Slots(k=cache.k, v=cache.v, length=zeros(), last=zeros(), seen=jnp.zeros((slots, config.vocab_size), bool),
                  steps=zeros(), rows=row_settings([SamplingParams.make_greedy()] * slots, [1] * slots, ()))


@functools.partial(jax.jit, static_argnames=("config", "policy"), donate_argnames=("state",))
def _prefill_slots(params, state: _Slots, slots, ids, n, rows, *, config: ModelConfig, policy: Policy):
    """Run the right-padded prompts ``ids`` (m, P) with ``n`` (m,) real tokens each, write their keys / values
    into cache columns 0..P-1 of ``slots`` (m,) and pick each its token 0 with ``rows`` (their settings, m rows).
    A slot index past the last slot marks a padding row: nothing of it is written. Returns (state, tokens (m,)).
    The padding after a prompt never reaches a real token (causal attention) and its columns are overwritten
    by the decode before the slot's length reaches them."""
    model = MiniMindLM(config, policy)
    m, p = ids.shape
    out = model.apply({"params": params}, ids, cache=KVCache.init(config, m, p, state.k.dtype))
    logits = jnp.take_along_axis(out.logits, (n - 1)[:, None, None], axis=1)[:, 0].astype(jnp.float32)  # (m, vocab)
    seen = jnp.zeros((m, config.vocab_size), bool).at[jnp.arange(m)[:, None], ids].max(jnp.arange(p) < n[:, None])
    token = pick_tokens(logits, seen, rows, jnp.zeros((m,), jnp.int32))
    seen = seen.at[jnp.arange(m), token].set(True)

    def put(every, new):  # rows into their slots; padding rows (slot index out of range) are dropped
        return every.at[slots].set(new, mode="drop")

    return state.replace(
        k=state.k.at[:, slots, :p].set(out.cache.k, mode="drop"),
        v=state.v.at[:, slots, :p].set(out.cache.v, mode="drop"),
        length=put(state.length, n), last=put(state.last, token), seen=put(state.seen, seen),
        steps=put(state.steps, jnp.ones((m,), jnp.int32)), rows=jax.tree.map(put, state.rows, rows)), token


def _first_slots(state: _Slots, width: int) -> _Slots:
    """The state of slots 0..width-1 (the cache's slot axis is 1, every other field's 0)."""
    return state.replace(k=state.k[:, :width], v=state.v[:, :width],
                         **{f: jax.tree.map(lambda x: x[:width], getattr(state, f))
                            for f in ("length", "last", "seen", "steps", "rows")})


def _with_first_slots(state: _Slots, part: _Slots) -> _Slots:
    return state.replace(k=state.k.at[:, :part.k.shape[1]].set(part.k), v=state.v.at[:, :part.v.shape[1]].set(part.v),
                         **{f: jax.tree.map(lambda x, y: x.at[:y.shape[0]].set(y), getattr(state, f), getattr(part, f))
                            for f in ("length", "last", "seen", "steps")})


@functools.partial(jax.jit, static_argnames=("config", "policy", "kv_len"), donate_argnames=("state",))
def _prefill_chunk(params, state: _Slots, slot, ids, start, final, rows, *, config: ModelConfig, policy: Policy,
                   kv_len: int):
    """Feed ``ids`` (1, C), a long prompt's tokens start..start+C-1, into ``slot``: they attend to the slot's
    cache columns before them, within its first ``kv_len`` (so the scores take C x kv_len: memory linear in the
    prompt), their keys / values are written there, and the slot's length becomes start + C. Picks a token
    from the last one's logits with ``rows`` (the slot's settings); only the prompt's ``final`` chunk's token
    means anything (and only then is it added to the slot's seen set). Returns (state, token)."""
    model = MiniMindLM(config, policy)
    k, v = (jax.lax.dynamic_index_in_dim(x, slot, axis=1)[:, :, :kv_len] for x in (state.k, state.v))
    out = model.apply({"params": params}, ids, cache=KVCache(k, v, start))
    logits = out.logits[:, -1].astype(jnp.float32)  # (1, vocab)
    seen = jnp.where(start == 0, False, state.seen[slot]).at[ids[0]].set(True)  # the prompt's tokens so far
    token = pick_tokens(logits, seen[None], rows, jnp.zeros((1,), jnp.int32))[0]
    seen = seen.at[token].max(final)

    def put(every, new):
        return every.at[slot[None]].set(new)

    return state.replace(
        k=state.k.at[:, slot, :kv_len].set(out.cache.k[:, 0]), v=state.v.at[:, slot, :kv_len].set(out.cache.v[:, 0]),
        length=state.length.at[slot].set(start + ids.shape[1]), last=state.last.at[slot].set(token),
        seen=state.seen.at[slot].set(seen), steps=state.steps.at[slot].set(1), rows=jax.tree.map(put, state.rows, rows),
    ), token


@functools.partial(jax.jit, static_argnames=("config", "policy", "width"), donate_argnames=("state",))
def _step_slots(params, state: _Slots, active, *, config: ModelConfig, policy: Policy, width: int):
    """One decode step of slots 0..width-1: feed each its last token at column ``length``, pick the next.
    Slots that are not ``active`` (width,) compute too, but nothing of theirs moves. Returns (state, tokens
    (width,)). ``width`` (a power of two, compiled once each) spares the work of the free slots above the
    highest one in use."""
    model = MiniMindLM(config, policy)
    part = _first_slots(state, width)

    def one_slot(k, v, length, token):  # one slot as a batch of one, with its own cache index
        out = model.apply({"params": params}, token[None, None], cache=KVCache(k[:, None], v[:, None], length))
        return out.logits[0, -1].astype(jnp.float32), out.cache.k[:, 0], out.cache.v[:, 0]

    logits, k, v = jax.vmap(one_slot, in_axes=(1, 1, 0, 0), out_axes=(0, 1, 1))(part.k, part.v, part.length, part.last)
    rows = part.rows.replace(greedy=part.rows.greedy | ~active)  # free slots never force the sampling path
    token = pick_tokens(logits, part.seen, rows, part.steps)
    seen = part.seen.at[jnp.arange(width), token].max(active)
    moved = active.astype(jnp.int32)
    part = part.replace(k=k, v=v, length=part.length + moved, last=jnp.where(active, token, part.last), seen=seen,
                        steps=part.steps + moved)
    return _with_first_slots(state, part), token


CHUNK_TOKENS = 512  # a prompt longer than this is prefilled in chunks of at most this many tokens
CHUNK_SCORES = 512 * 2048  # the most query x column pairs one chunk attends (chunks shrink to stay within it)


class SlotDecoder:
    """``slots`` decode slots over one KV cache of ``cache_len`` tokens per slot (see the module docstring).

    >>> dec = SlotDecoder(params, config, slots=4, cache_len=512)
    >>> first = dec.prefill(0, prompt_ids, SamplingParams(seed=3))   # slot 0 is now active
    >>> tokens = dec.step()                                          # (4,) next token of every slot
    >>> dec.release(0)
    """

    def __init__(self, params, config: ModelConfig, policy: Policy | str = "fp32", *, slots: int = 8,
                 cache_len: int | None = None, prefill_tokens: int = 2048, chunk_tokens: int = CHUNK_TOKENS,
                 chunk_scores: int = CHUNK_SCORES):
        cache_len = config.max_position_embeddings if cache_len is None else int(cache_len)
        if slots < 1 or cache_len < 2:
            raise ValueError(f"need at least 1 slot and a cache of 2 tokens, got slots={slots}, cache_len={cache_len}")
        if cache_len > config.max_position_embeddings:
            raise ValueError(f"cache_len {cache_len} exceeds the model's max_position_embeddings "
                             f"({config.max_position_embeddings})")
        self.config = config
        # vmap has no batching rule for ragged_dot along the slot axis (jax 0.10), so the vmapped decode step
        # runs MoE layers densely (what ``auto`` does on the CPU anyway); the prefill keeps the config's choice.
        self.step_config = dataclasses.replace(config, moe_impl="dense") if config.use_moe else config
        self.policy = get_policy(policy)
        self.params = params
        self.slots = slots
        self.cache_len = cache_len
        self.prefill_tokens = int(prefill_tokens)  # the most padded tokens (rows x bucket) prefilled at once
        if chunk_tokens < 1 or chunk_scores < 1:
            raise ValueError(f"chunk_tokens and chunk_scores must be positive, got {chunk_tokens}, {chunk_scores}")
        self.chunk_tokens = int(chunk_tokens)  # a longer prompt is prefilled in chunks of at most this many tokens,
        self.chunk_scores = int(chunk_scores)  # fewer where chunk x columns attended would exceed this
        self.active = np.zeros(slots, bool)
        self.reset()

    @classmethod
    def for_generator(cls, generator, *, slots: int, cache_len: int | None = None, **kwargs) -> SlotDecoder:
        """Slots over a :class:`~minimind_jax.generate.Generator`'s params (already cast and on the device)."""
        return cls(generator.params, generator.config, generator.policy, slots=slots, cache_len=cache_len, **kwargs)

    def reset(self) -> None:
        """Empty every slot (a fresh cache; after a failed step the old one may be gone)."""
        self._state = _empty_slots(self.config, self.slots, self.cache_len, self.policy.compute_dtype)
        self.active[:] = False

    def warm_up(self) -> float:
        """Compile every step width, every prefill shape (rows, prompt bucket) within ``prefill_tokens`` for
        prompts up to ``chunk_tokens`` and every chunk shape now (seconds taken), so that no request waits for a
        compile later; runs only while every slot is free (what it computes is dropped)."""
        if self.active.any():
            raise RuntimeError("warm_up needs every slot free")
        t0 = time.perf_counter()
        for p in sorted({self._bucket(n) for n in range(1, min(self.chunk_tokens + 1, self.cache_len))}):
            for m in self._widths():
                if m == 1 or m * p <= self.prefill_tokens:
                    slots = list(range(m))
                    self.prefill_many(slots, [[0] * min(p, self.cache_len - 1)] * m, [SamplingParams(seed=0)] * m)
                    self.active[:] = False
        for kv_len in sorted({self._bucket(end) for end in range(self.chunk_tokens, self.cache_len)}):
            self._chunk(0, [0] * self._chunk_len(kv_len), 0, kv_len, SamplingParams(seed=0), final=False)
        for width in self._widths():
            self.active[width - 1] = True
            self.step()
            self.active[:] = False
        return time.perf_counter() - t0

    def _widths(self) -> list[int]:
        """The row counts programs are compiled for: powers of two below ``slots``, and ``slots``."""
        return sorted({min(1 << i, self.slots) for i in range(self.slots.bit_length() + 1)})

    def _width(self, rows: int) -> int:
        return min(bucket_length(rows, minimum=1), self.slots)

    def _bucket(self, prompt_len: int) -> int:
        return min(bucket_length(prompt_len), self.cache_len)

    def group_size(self, lengths: Sequence[int]) -> int:
        """How many of these waiting prompts (in order, lengths in tokens) one :meth:`prefill_many` takes: the
        longest prefix whose padded size (rows x prompt bucket) is within ``prefill_tokens``, at least one."""
        k = 1
        while k < len(lengths) and self._width(k + 1) * self._bucket(max(lengths[:k + 1])) <= self.prefill_tokens:
            k += 1
        return k

    def check(self, prompt_ids: Sequence[int]) -> None:
        """Raise ValueError unless the prompt fits a slot and its ids are in the vocabulary."""
        n = len(prompt_ids)
        if not 0 < n < self.cache_len:
            raise ValueError(f"a prompt of {n} tokens does not fit a slot of {self.cache_len} tokens")
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.config.vocab_size:
            raise ValueError(f"the prompt has ids outside the vocabulary (size {self.config.vocab_size})")

    def prefill(self, slot: int, prompt_ids: Sequence[int], sampling: SamplingParams) -> int:
        """Put a prompt into the free ``slot`` and return its first new token."""
        return self.prefill_many([slot], [prompt_ids], [sampling])[0]

    def prefill_many(self, slots: Sequence[int], prompts: Sequence[Sequence[int]],
                     samplings: Sequence[SamplingParams]) -> list[int]:
        """Put several prompts into free slots in one call (their rows padded to a power-of-two count, their
        length to the longest's bucket: compiled once per (rows, bucket)); returns each its first new token.
        A request's tokens do not depend on the others prefilled with it."""
        if len(set(slots)) != len(slots) or self.active[list(slots)].any():
            raise ValueError(f"slots {list(slots)} are not distinct free slots")
        for ids in prompts:
            self.check(ids)
        k, m = len(prompts), self._width(len(prompts))
        p = self._bucket(max(len(ids) for ids in prompts))
        ids = np.zeros((m, p), np.int32)
        for i, prompt in enumerate(prompts):
            ids[i, :len(prompt)] = prompt
        n = np.ones(m, np.int32)
        n[:k] = [len(prompt) for prompt in prompts]
        where = np.full(m, self.slots, np.int32)  # padding rows go to no slot
        where[:k] = slots
        rows = row_settings(list(samplings) + [SamplingParams.make_greedy()] * (m - k), [1] * m, ())
        self._state, tokens = _prefill_slots(self.params, self._state, jnp.asarray(where), jnp.asarray(ids),
                                             jnp.asarray(n), rows, config=self.config, policy=self.policy)
        self.active[list(slots)] = True
        return [int(t) for t in np.asarray(tokens)[:k]]

    def chunked(self, prompt_len: int) -> bool:
        """Whether a prompt of this many tokens is prefilled in chunks (:meth:`prefill_part`)."""
        return prompt_len > self.chunk_tokens

    def _chunk_len(self, kv_len: int) -> int:
        """Tokens per chunk that attends within ``kv_len`` columns: ``chunk_tokens``, halved while chunk x kv_len
        exceeds ``chunk_scores`` (down to chunk_tokens / 32), so a chunk late in a long prompt costs about what an
        early one does and the other slots' next token waits no longer."""
        c = self.chunk_tokens
        while c > max(1, self.chunk_tokens // 32) and c * kv_len > self.chunk_scores:
            c //= 2
        return c

    def prefill_part(self, slot: int, prompt_ids: Sequence[int], done: int,
                     sampling: SamplingParams) -> tuple[int, int | None]:
        """Prefill the next chunk of a long prompt, ``done`` of its tokens being in the free ``slot`` already (0 at
        first). Returns (tokens done, the first new token after the last chunk, else None); the slot turns active
        with that token. A chunk attending within the cache bucket ``kv_len`` holds ``_chunk_len(kv_len)`` real
        tokens: the last one starts that many before the prompt's end (recomputing a few columns rather than
        padding past the prompt), so one program per cache bucket serves every prompt length."""
        n = len(prompt_ids)
        if done == 0:
            self.check(prompt_ids)
            if self.active[slot]:
                raise ValueError(f"slot {slot} is not free")
        if not self.chunked(n) or not 0 <= done < n:
            raise ValueError(f"no chunk to prefill: {done} of {n} tokens done, chunks of {self.chunk_tokens}")
        kv_len = self._bucket(min(done + self.chunk_tokens, n))  # within it: start + c <= that end
        c = self._chunk_len(kv_len)
        start = min(done, n - c)
        final = start + c == n
        token = self._chunk(slot, prompt_ids[start:start + c], start, kv_len, sampling, final)
        if not final:
            return start + c, None
        self.active[slot] = True
        return n, token

    def _chunk(self, slot: int, ids: Sequence[int], start: int, kv_len: int, sampling: SamplingParams,
               final: bool) -> int:
        rows = row_settings([sampling], [1], ())
        ids = jnp.asarray(np.asarray(ids, np.int32)[None])
        self._state, token = _prefill_chunk(self.params, self._state, jnp.int32(slot), ids, jnp.int32(start),
                                            jnp.bool_(final), rows, config=self.config, policy=self.policy,
                                            kv_len=kv_len)
        return int(token)

    def step(self) -> np.ndarray:
        """One token for every slot, (slots,) int; only the active slots' entries mean anything."""
        used = np.flatnonzero(self.active)
        width = self._width(int(used[-1]) + 1 if used.size else 1)
        self._state, tokens = _step_slots(self.params, self._state, jnp.asarray(self.active[:width]),
                                          config=self.step_config, policy=self.policy, width=width)
        out = np.zeros(self.slots, np.int32)
        out[:width] = np.asarray(tokens)
        return out

    def release(self, slot: int) -> None:
        self.active[slot] = False


# ------------------------------------------------------------------------------------------------ requests


class EngineError(Exception):
    """Why a request was refused or ended without an answer, with the HTTP status a server answers it with."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


class Request:
    """One generation: a prompt, its token limit and sampling settings. The engine calls the hooks below from
    its thread; a subclass (the server's jobs) overrides them to turn tokens into text and answers. Set
    ``cancelled`` (any thread) to end it: its slot is freed before the next decode step."""

    def __init__(self, prompt_ids: Sequence[int], max_tokens: int, sampling: SamplingParams | None = None):
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.max_tokens = int(max_tokens)
        self.sampling = sampling or SamplingParams.make_greedy()
        self.cancelled = False
        self.tokens: list[int] = []
        self.finish_reason: str | None = None  # "stop", "length" or "cancelled"
        self.error: EngineError | None = None
        self.finished = threading.Event()
        self.deadline: float | None = None  # time.monotonic() by which it must be done (set by the engine)
        self.submitted_at: float | None = None
        self.first_token_at: float | None = None

    # -- hooks (engine thread)
    def on_start(self) -> None:
        """The prompt is in a slot (called before its first token)."""

    def on_token(self, token: int, is_eos: bool) -> bool:
        """A new token (already appended to ``tokens``); return True to end the request here ("stop")."""
        return False

    def on_finish(self, reason: str) -> None:
        """The request ended with ``finish_reason`` ``reason``."""

    def on_error(self, error: EngineError) -> None:
        """The request ended without an answer (timeout, shutdown, a failed generation)."""

    # -- for callers
    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the end: the tokens and finish reason, or raises the :class:`EngineError`."""
        if not self.finished.wait(timeout):
            raise TimeoutError(f"the request did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        return GenerationResult(list(self.tokens), self.finish_reason)


# ------------------------------------------------------------------------------------------------ the scheduler


class Engine:
    """The queue of :class:`Request` objects and the worker thread that runs them on ``decoder``'s slots.

    ``max_queue`` requests may wait for a slot (more: :class:`EngineError` 429 ``queue_full``); a request not
    done ``timeout_s`` after it was submitted ends with 504 ``timeout``; after :meth:`close` new requests get
    503 ``shutting_down`` and the ones waiting or running end with it. ``decoder`` is a :class:`SlotDecoder`
    or anything with its ``slots``, ``cache_len``, ``active``, ``prefill``, ``step``, ``release``, ``reset``
    (and ``warm_up`` with ``warm_up=True``: every step width and prompt bucket compiles before the first
    request, instead of stalling the running rows the first time a shape is needed). When several requests
    wait and the decoder has ``prefill_many`` (with ``group_size`` and ``check``), up to ``prefill_rows`` of
    them are prefilled in one call, so the running rows stall once for the group, not once per request.
    """

    def __init__(self, decoder, eos_ids: Sequence[int], *, max_queue: int = 64, timeout_s: float | None = None,
                 warm_up: bool = False, prefill_rows: int | None = None):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.decoder = decoder
        self.eos_ids = frozenset(int(e) for e in eos_ids)
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        # the most waiting requests prefilled in one call (default: every free slot; 1: one at a time)
        self.prefill_rows = decoder.slots if prefill_rows is None else max(1, int(prefill_rows))
        self.warm_up = warm_up  # compile every shape (decoder.warm_up) before serving, requests queue meanwhile
        self.slots: list[Request | None] = [None] * decoder.slots
        self._chunking: dict[int, int] = {}  # slot -> prompt tokens prefilled so far, for a long prompt's slot
        self.steps_with_rows = [0] * (decoder.slots + 1)  # how many decode steps ran with k slots in use
        self._waiting: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._rate: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) per step

    # -- lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._closing = False
            self._thread = threading.Thread(target=self._run, name="minimind-engine", daemon=True)
            self._thread.start()

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop taking requests; the waiting and running ones end with 503; the worker thread ends."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, request: Request) -> Request:
        """Queue ``request``; raises :class:`EngineError` (400 too long for a slot, 429 queue full, 503 closing)."""
        n, cap = len(request.prompt_ids), self.decoder.cache_len
        if n == 0 or request.max_tokens < 1:
            raise EngineError(400, "a request needs a prompt and max_tokens >= 1", "invalid_value")
        if n + request.max_tokens > cap:
            raise EngineError(400, f"the prompt ({n} tokens) plus max_tokens ({request.max_tokens}) exceeds the "
                                   f"server's context of {cap} tokens", "context_length_exceeded")
        with self._cond:
            if self._closing or self._thread is None:
                raise EngineError(503, "the server is shutting down", "shutting_down")
            if len(self._waiting) >= self.max_queue:
                raise EngineError(429, f"the server is busy: {len(self._waiting)} requests are waiting for one of "
                                       f"its {len(self.slots)} slots; retry later", "queue_full")
            request.submitted_at = time.monotonic()
            if self.timeout_s is not None:
                request.deadline = request.submitted_at + self.timeout_s
            self._waiting.append(request)
            self._cond.notify_all()
        return request

    # -- figures
    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def slots_in_use(self) -> int:
        return sum(r is not None for r in self.slots)

    def tokens_per_s(self) -> float:
        """Tokens generated per second over the last few seconds (0 when idle)."""
        now = time.monotonic()
        with self._cond:  # the worker appends to it meanwhile
            recent = [k for t, k in self._rate if now - t <= _RATE_WINDOW_S]
        return sum(recent) / _RATE_WINDOW_S

    # -- the worker
    def _run(self) -> None:
        if self.warm_up:
            try:
                log.info("decode slots compiled in %.1f s", self.decoder.warm_up())
            except Exception:  # serving goes on; the shapes compile when first used
                log.exception("warm-up failed")
                self.decoder.reset()
        while True:
            with self._cond:
                while not (self._closing or self._waiting or self._chunking or self.decoder.active.any()):
                    self._cond.wait()
                if self._closing:
                    break
            try:
                self._drop_ended()
                self._admit()
                self._prefill_chunks()
                if self.decoder.active.any():
                    self._step()
            except Exception as e:  # the server must outlive a failed step: its rows get a 500
                log.exception("generation failed")
                self._fail_running(EngineError(500, f"generation failed: {type(e).__name__}: {e}", "generation_failed"))
                self.decoder.reset()
        closing = EngineError(503, "the server is shutting down", "shutting_down")
        self._fail_running(closing)
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for r in waiting:
            self._fail(r, closing)

    def _expired(self, r: Request, now: float) -> bool:
        return r.deadline is not None and now > r.deadline

    def _timeout(self, r: Request) -> EngineError:
        return EngineError(504, f"the request did not finish within the server's timeout of {self.timeout_s} s "
                                f"({len(r.tokens)} tokens generated)", "timeout")

    def _drop_ended(self) -> None:
        """Free the slots of cancelled and timed-out requests; drop such requests from the queue."""
        now = time.monotonic()
        for slot, r in enumerate(self.slots):
            if r is not None and r.cancelled:
                self._end(slot, "cancelled")
            elif r is not None and self._expired(r, now):
                self._release(slot)
                self._fail(r, self._timeout(r))
        with self._cond:
            gone = [r for r in self._waiting if r.cancelled or self._expired(r, now)]
            for r in gone:
                self._waiting.remove(r)
        for r in gone:
            if r.cancelled:
                self._finish(r, "cancelled")
            else:
                self._fail(r, self._timeout(r))

    def _admit(self) -> None:
        """Prefill waiting requests into the free slots, several in one call where the decoder can (each join
        stalls the running rows for one prefill); each one's first token is handled at once. A prompt the decoder
        prefills in chunks takes its slot now and gets one chunk per decode step (:meth:`_prefill_chunks`), one
        such prompt at a time; shorter requests queued behind it are admitted meanwhile."""
        while True:
            free = [slot for slot, r in enumerate(self.slots) if r is None]
            with self._cond:
                long = None if self._chunking else next((r for r in self._waiting if self._long(r)), None)
                short = [r for r in self._waiting if not self._long(r)][:min(len(free), self.prefill_rows)]
                if free and long is not None:
                    self._waiting.remove(long)
            if not free:
                return
            if long is not None:
                self.slots[free[0]] = long
                self._chunking[free[0]] = 0
                continue
            if not short:
                return
            # decoders without prefill_many (scripted ones in tests) take one prompt at a time
            many = getattr(self.decoder, "prefill_many", None)
            group = short[:self.decoder.group_size([len(r.prompt_ids) for r in short]) if many else 1]
            with self._cond:
                for r in group:
                    self._waiting.remove(r)  # only this thread takes from the queue
            group = self._prefill(group, free[:len(group)], many)
            for slot, (r, token) in zip(free, group):
                if r is not None:
                    self.slots[slot] = r
                    r.on_start()
                    self._push(slot, token)

    def _long(self, r: Request) -> bool:
        chunked = getattr(self.decoder, "chunked", None)
        return chunked is not None and chunked(len(r.prompt_ids))

    def _prefill_chunks(self) -> None:
        """One chunk of the long prompt being prefilled; after its last one it decodes with the others."""
        for slot, done in list(self._chunking.items()):
            r = self.slots[slot]
            try:
                done, token = self.decoder.prefill_part(slot, r.prompt_ids, done, r.sampling)
            except Exception as e:  # this prompt failed; the others go on
                log.exception("prefill failed")
                self._release(slot)
                self._fail(r, EngineError(500, f"generation failed: {type(e).__name__}: {e}", "generation_failed"))
                continue
            if token is None:
                self._chunking[slot] = done
            else:
                del self._chunking[slot]
                r.on_start()
                self._push(slot, token)

    def _prefill(self, group: list[Request], slots: list[int], many) -> list[tuple[Request | None, int]]:
        """Prefill ``group`` into ``slots``: (request, first token) per slot, (None, 0) where the request failed
        (it got its 500; the slot stays free). A prompt the decoder refuses fails alone."""
        def fail(r: Request, e: Exception) -> None:
            log.exception("prefill failed")
            self._fail(r, EngineError(500, f"generation failed: {type(e).__name__}: {e}", "generation_failed"))

        if many is None or len(group) == 1:
            try:
                return [(group[0], self.decoder.prefill(slots[0], group[0].prompt_ids, group[0].sampling))]
            except Exception as e:  # this prompt failed; the others go on
                fail(group[0], e)
                return [(None, 0)]
        ok = []
        for r in group:
            try:
                self.decoder.check(r.prompt_ids)
                ok.append(r)
            except ValueError as e:
                fail(r, e)
        try:
            tokens = many(slots[:len(ok)], [r.prompt_ids for r in ok], [r.sampling for r in ok]) if ok else []
        except Exception as e:
            for r in ok:
                fail(r, e)
            return [(None, 0)] * len(group)
        return list(zip(ok, tokens)) + [(None, 0)] * (len(group) - len(ok))

    def _step(self) -> None:
        rows = self.slots_in_use - len(self._chunking)
        tokens = self.decoder.step()
        self.steps_with_rows[rows] += 1
        now = time.monotonic()
        with self._cond:
            self._rate.append((now, rows))
            while now - self._rate[0][0] > _RATE_WINDOW_S:
                self._rate.popleft()
        for slot, r in enumerate(self.slots):
            if r is not None and slot not in self._chunking:
                self._push(slot, int(tokens[slot]))

    def _push(self, slot: int, token: int) -> None:
        """Hand one new token to the slot's request; end it on an eos id, a stop string or its limit."""
        r = self.slots[slot]
        if r.first_token_at is None:
            r.first_token_at = time.monotonic()
        r.tokens.append(token)
        eos = token in self.eos_ids
        if r.on_token(token, eos) or eos:
            self._end(slot, "stop")
        elif len(r.tokens) >= r.max_tokens:
            self._end(slot, "length")

    def _release(self, slot: int) -> None:
        self.slots[slot] = None
        self._chunking.pop(slot, None)
        self.decoder.release(slot)

    def _end(self, slot: int, reason: str) -> None:
        r = self.slots[slot]
        self._release(slot)
        self._finish(r, reason)

    def _finish(self, r: Request, reason: str) -> None:
        r.finish_reason = reason
        try:
            r.on_finish(reason)
        finally:
            r.finished.set()

    def _fail(self, r: Request, error: EngineError) -> None:
        r.error = error
        try:
            r.on_error(error)
        finally:
            r.finished.set()

    def _fail_running(self, error: EngineError) -> None:
        for slot, r in enumerate(self.slots):
            if r is not None:
                self._release(slot)
                self._fail(r, error)


# ------------------------------------------------------------------------------------------------ rows of ids


class _RowRequest(Request):
    """One row of a :class:`RowStream`: its tokens, its end and its error go to the stream's queue."""

    def __init__(self, row: int, prompt_ids, max_tokens: int, sampling, out: queue.Queue):
        super().__init__(prompt_ids, max_tokens, sampling)
        self.row, self.out = row, out

    def on_token(self, token: int, is_eos: bool) -> bool:
        self.out.put((self.row, token))
        return False

    def on_finish(self, reason: str) -> None:
        self.out.put((self.row, None))

    def on_error(self, error: EngineError) -> None:
        self.out.put((self.row, error))


class RowStream(Iterator[list[list[int]]]):
    """Rows of token ids decoded on an :class:`Engine`'s slots, submitted when the stream is made (an
    :class:`EngineError` then: 400 / 429 / 503). Each item is every row's new tokens since the last item (a
    row's tokens end with its eos id when it stops on one), as :meth:`Generator.stream
    <minimind_jax.generate.Generator.stream>` yields them; a row's error (504 timeout, 503, 500) is raised.
    :meth:`close` cancels the rows still running."""

    def __init__(self, engine: Engine, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: Sequence[SamplingParams]):
        self._out: queue.Queue = queue.Queue()
        self.requests = [_RowRequest(i, p, max_new_tokens, s, self._out)
                         for i, (p, s) in enumerate(zip(prompts, sampling, strict=True))]
        self._open = len(self.requests)
        try:
            for r in self.requests:
                engine.submit(r)
        except EngineError:
            self.close()
            raise

    def __next__(self) -> list[list[int]]:
        if not self._open:
            raise StopIteration
        new: list[list[int]] = [[] for _ in self.requests]
        item = self._out.get()  # the engine ends every request (its end, an error, a timeout, shutdown)
        while True:
            row, what = item
            if what is None:
                self._open -= 1
            elif isinstance(what, EngineError):
                self.close()
                raise what
            else:
                new[row].append(what)
            try:
                item = self._out.get_nowait()
            except queue.Empty:
                return new

    def close(self) -> None:
        """Cancel the rows still running and end the stream (from the thread that iterates it)."""
        self._open = 0
        self.cancel()

    def cancel(self) -> None:
        """Cancel the rows still running, from any thread: the engine ends each (its slot freed before the next
        step), so a ``next()`` waiting in another thread returns and the stream then ends."""
        for r in self.requests:
            r.cancelled = True  # a no-op once it is done


class EngineRows:
    """Token-id rows on an :class:`Engine`'s slots with the :class:`~minimind_jax.generate.Generator` calls
    the completions API uses (``generate``, ``stream``, ``eos_ids``): its rows share the slots, the queue and
    its limits with every other request. Each row's tokens for a seed are those the Generator gives."""

    def __init__(self, engine: Engine):
        self.engine = engine

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return tuple(sorted(self.engine.eos_ids))

    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
               sampling: Sequence[SamplingParams]) -> RowStream:
        return RowStream(self.engine, prompts, max_new_tokens, sampling)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sequence[SamplingParams],
                 on_stream: Callable[[RowStream], None] | None = None) -> list[GenerationResult]:
        """The rows' results once all have ended; ``on_stream`` is given their :class:`RowStream` as soon as
        they are submitted (its ``cancel()``, from any thread, ends them: a client that left)."""
        rows = self.stream(prompts, max_new_tokens, sampling)
        if on_stream is not None:
            on_stream(rows)
        for _ in rows:
            pass
        return [r.result() for r in rows.requests]
