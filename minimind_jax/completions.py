"""OpenAI's legacy completions API (``POST /v1/completions``) with prompt log-probabilities, as lm-eval's
``local-completions`` model uses it: request parsing, prompt scoring on the jitted forward pass
(:class:`~minimind_jax.evaluation.scoring.Scorer`), generation and the response. In the server the rows are
decoded on its :class:`~minimind_jax.engine.Engine` (:class:`~minimind_jax.engine.EngineRows`): they share the
decode slots with the chat requests, wait in the same bounded queue (429 ``queue_full`` beyond it, 503 while
shutting down, 504 past the request timeout) and give, for a seed, the tokens the
:class:`~minimind_jax.generate.Generator` gives; a router made without an engine runs one request at a time on
the Generator.

``prompt`` is a text, a list of texts, a list of token ids or a list of such lists; ``max_tokens`` may be 0 (with
``echo``: score the prompt only); ``logprobs`` (0-20) returns ``tokens``, ``token_logprobs``, ``top_logprobs``
and ``text_offset`` (the first prompt token has no log-prob: ``null``, as OpenAI answers). Errors are OpenAI's
``{"error": {...}}`` with status 400.

``stream: true`` answers Server-Sent Events in OpenAI's completions chunk shape: one choice per chunk (``index``
tells the ``n`` rows of each prompt apart, prompt-major), the echoed prompt first, then each decode step's new text;
a choice's last chunk has its ``finish_reason``; ``stream_options.include_usage`` adds ``"usage": null`` to every
chunk and a last chunk with no choices and the usage; ``data: [DONE]`` ends the stream. Text that could be the
start of a stop string is held back until it is not (a stop string never shows, not even in part), and so is a
partial UTF-8 character. With ``logprobs`` each chunk carries the log-probs of the tokens whose text it completes
(rescored on the prompt scorer once per step that releases tokens; the stream without ``logprobs`` costs nothing
extra); joined, the chunks' texts are the plain response's, and so are their tokens and log-probs unless a stop
string cut the text (the stream leaves out the tokens from the one the stop string starts in; the plain response
lists every generated token). ``usage.completion_tokens`` of a stream counts each row's tokens up to its end (its
eos, its limit, or the token that completed a stop string).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from minimind_jax.chat_format import StopStrings
from minimind_jax.engine import Engine, EngineError, EngineRows
from minimind_jax.evaluation.scoring import MAX_TOP_LOGPROBS, Scorer
from minimind_jax.generate import SamplingParams, TextStream
from minimind_jax.sse import STALL_S, EventStream

__all__ = ["CompletionError", "CompletionRequest", "complete", "completions_router", "parse_completion_request",
           "stream_completion"]


class CompletionError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str = "invalid_value"):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    @classmethod
    def from_engine(cls, error: EngineError) -> CompletionError:
        """The engine's refusal (400 too long, 429 queue full, 503 shutting down, 504 timeout)."""
        return cls(error.message, None, error.status, error.code)

    def body(self) -> dict:
        kind = ("rate_limit_error" if self.status == 429 else
                "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class CompletionRequest:
    prompts: list[list[int]]
    max_tokens: int
    echo: bool
    logprobs: int | None
    n: int
    stop: list[str]
    sampling: SamplingParams
    stream: bool = False
    include_usage: bool = False

    def rows(self) -> tuple[list[list[int]], list[SamplingParams]]:
        """The generated rows, prompt-major (``n`` per prompt), and their sampling (row j of a prompt: seed + j)."""
        rows = [p for p in self.prompts for _ in range(self.n)]
        samplings = [dataclasses.replace(self.sampling, seed=self.sampling.seed + j) for _ in self.prompts
                     for j in range(self.n)]
        return rows, samplings


def _prompts(value: Any, tokenizer, vocab: int) -> list[list[int]]:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise CompletionError("prompt must be a text, a list of texts, token ids or a list of token-id lists",
                              "prompt")
    out = []
    for p in value:
        if isinstance(p, str):
            ids = tokenizer.encode(p, add_special_tokens=False)
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            ids = list(p)
        else:
            raise CompletionError("each prompt must be a text or a list of token ids", "prompt")
        if not ids:
            raise CompletionError("a prompt is empty", "prompt")
        if min(ids) < 0 or max(ids) >= vocab:
            raise CompletionError(f"token ids must be in [0, {vocab})", "prompt")
        out.append(ids)
    return out


def _int(body: dict, key: str, default, lo: int, hi: int):
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise CompletionError(f"{key} must be an integer in [{lo}, {hi}], got {value!r}", key)
    return value


def parse_completion_request(body: Any, tokenizer, vocab: int, context: int) -> CompletionRequest:
    """The request, checked: every prompt plus ``max_tokens`` must fit in the ``context``."""
    if not isinstance(body, dict):
        raise CompletionError("the request body must be a JSON object")
    stream, include_usage = _stream_settings(body)
    prompts = _prompts(body.get("prompt"), tokenizer, vocab)
    max_tokens = _int(body, "max_tokens", 16, 0, context)
    logprobs = _int(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    n = _int(body, "n", 1, 1, 16)
    for p in prompts:
        if len(p) + max_tokens > context:
            raise CompletionError(f"the prompt ({len(p)} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                                  f"context of {context} tokens", "prompt")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise CompletionError("stop must be a text or a list of at most 4 texts", "stop")
    temperature = body.get("temperature", 1.0)
    top_p = body.get("top_p", 1.0)
    try:
        sampling = SamplingParams(temperature=float(temperature), top_p=float(top_p),
                                  seed=_int(body, "seed", 0, 0, 2**31 - 1))
    except (TypeError, ValueError) as e:
        raise CompletionError(str(e), "temperature") from None
    return CompletionRequest(prompts, max_tokens, bool(body.get("echo", False)), logprobs, n, stop, sampling,
                             stream, include_usage)


def _stream_settings(body: dict) -> tuple[bool, bool]:
    """(stream, stream_options.include_usage) of the request."""
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise CompletionError(f"stream must be a boolean, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise CompletionError("stream_options must be an object", "stream_options")
    if options and not stream:
        raise CompletionError("stream_options is only allowed with stream: true", "stream_options")
    include_usage = options.get("include_usage", False)
    if include_usage is not None and not isinstance(include_usage, bool):
        raise CompletionError("stream_options.include_usage must be a boolean", "stream_options")
    return bool(stream), bool(include_usage)


def _logprobs_block(tokenizer, ids: list[int], scores, start: int, k: int, offset0: int = 0) -> dict:
    """OpenAI's ``logprobs`` object for tokens ``ids[start:]`` (scores: the Scorer's for ``ids``)."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    text = ""
    for i in range(start, len(ids)):
        piece = tokenizer.decode([ids[i]])
        offsets.append(offset0 + len(text))
        text += piece
        tokens.append(piece)
        if i == 0:
            token_logprobs.append(None)
            top.append(None)
            continue
        token_logprobs.append(float(scores.logprobs[i - 1]))
        top.append({tokenizer.decode([t]): lp for t, lp in scores.top[i - 1][:k]} if k else {})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def _cut(text: str, stop: list[str]) -> tuple[str, bool]:
    cuts = [text.index(s) for s in stop if s and s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


def complete(req: CompletionRequest, generator, scorer: Scorer | None, tokenizer,
             **generate_kwargs) -> tuple[list[dict], int]:
    """The ``choices`` of the response (prompt-major, ``n`` per prompt) and the number of generated tokens;
    ``generate_kwargs`` go to ``generator.generate`` (``on_stream`` for engine rows)."""
    rows, samplings = req.rows()
    generated = ([r.tokens for r in generator.generate(rows, req.max_tokens, samplings, **generate_kwargs)]
                 if req.max_tokens else [[] for _ in rows])
    seqs = [prompt + new for prompt, new in zip(rows, generated)]  # an eos a row stopped on keeps its log-prob,
    # as lm-eval's parser expects; every row scored in one batch
    scores = scorer.score(seqs, top=req.logprobs) if req.logprobs is not None else [None] * len(rows)
    eos = set(generator.eos_ids)
    choices = []
    for index, (prompt, new, ids, sc) in enumerate(zip(rows, generated, seqs, scores)):
        finish = "stop" if new and new[-1] in eos else "length"
        text, stopped = _cut(tokenizer.decode([t for t in new if t not in eos]), req.stop)
        finish = "stop" if stopped else finish
        prompt_text = tokenizer.decode(prompt) if req.echo else ""
        logprobs = None if sc is None else _logprobs_block(tokenizer, ids, sc, 0 if req.echo else len(prompt),
                                                           req.logprobs)
        choices.append({"index": index, "text": prompt_text + text, "logprobs": logprobs, "finish_reason": finish})
    return choices, sum(map(len, generated))


class _ChoiceStream:
    """One streamed choice: its generated ids turned into text deltas (a partial UTF-8 character and a possible
    start of a stop string held back, the text cut at a stop string) and, for ``logprobs``, how many of its ids
    have had their text sent in full (their log-probs go out with that text)."""

    def __init__(self, tokenizer, prompt: list[int], stop: list[str], eos: set[int]):
        self.tokenizer, self.prompt, self.eos = tokenizer, prompt, eos
        self.text = TextStream(tokenizer)
        self.stops = StopStrings(stop)
        self.ids: list[int] = []  # generated, an eos it ended on included
        self.sent = ""  # generated text sent so far
        self.released = 0  # ids whose log-probs were sent
        self.offset = 0  # text_offset of the next released token
        self.finish: str | None = None
        self.announced = False  # its finish_reason was sent

    def push(self, tokens: list[int]) -> str:
        """The text to send after the row's new ``tokens`` (one at a time, so the row ends at its stop string)."""
        out = ""
        for t in tokens:
            if self.finish:
                break
            self.ids.append(t)
            if t in self.eos:
                out += self._tail()
                self.finish = "stop"
                break
            out += self.stops.feed(self.text.push([t]))
            if self.stops.stopped:
                self.finish = "stop"
        self.sent += out
        return out

    def close(self) -> str:
        """The rest of the text when generation ended at the token limit."""
        if self.finish:
            return ""
        self.finish = "length"
        out = self._tail()
        self.sent += out
        return out

    def _tail(self) -> str:
        return "" if self.stops.stopped else self.stops.feed(self.text.flush()) + self.stops.finish()

    def releasable(self) -> int:
        """How many ids have their whole text sent (an eos the row ended on goes with the last text)."""
        if self.finish and not self.stops.stopped:
            return len(self.ids)  # all of its text is sent
        n = self.released
        while n < len(self.ids) and self.ids[n] not in self.eos:
            piece = self.tokenizer.decode(self.ids[:n + 1])
            if piece.endswith("\ufffd") or len(piece) > len(self.sent):
                break
            n += 1
        return n


def _stream_logprobs(streams: list[_ChoiceStream], upto: list[int], scorer: Scorer, tokenizer, k: int,
                     echo: bool = False) -> list[dict]:
    """Each stream's ``logprobs`` block for its ids ``released:upto`` (the prompt's tokens with ``echo``), scored
    in one batch."""
    empty = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    seqs = [s.prompt if echo else s.prompt + s.ids[:u] for s, u in zip(streams, upto)]
    todo = [i for i, s in enumerate(streams) if echo or upto[i] > s.released]
    scores = dict(zip(todo, scorer.score([seqs[i] for i in todo], top=k))) if todo else {}
    blocks = []
    for i, s in enumerate(streams):
        if i not in scores:
            blocks.append(empty)
            continue
        start = 0 if echo else len(s.prompt) + s.released
        block = _logprobs_block(tokenizer, seqs[i], scores[i], start, k, s.offset)
        s.offset += sum(map(len, block["tokens"]))
        if not echo:
            s.released = upto[i]
        blocks.append(block)
    return blocks


def stream_completion(req: CompletionRequest, generator, scorer: Scorer | None, tokenizer) -> Iterator[dict]:
    """The stream's ``choices`` entries in order (one choice each), then ``{"usage": completion tokens}``;
    ``scorer`` is needed only with ``logprobs``."""
    rows, samplings = req.rows()
    eos = set(generator.eos_ids)
    streams = [_ChoiceStream(tokenizer, prompt, req.stop, eos) for prompt in rows]
    k = req.logprobs

    def choices(texts: list[str], echo: bool = False) -> Iterator[dict]:
        blocks = None
        if k is not None:  # releasable() decodes prefixes: only the logprobs need it
            upto = [len(s.ids) if echo else s.releasable() for s in streams]
            blocks = _stream_logprobs(streams, upto, scorer, tokenizer, k, echo)
        for i, (s, text) in enumerate(zip(streams, texts)):
            finish = None if s.announced else s.finish
            if text or finish or (blocks and blocks[i]["tokens"]):
                s.announced = s.announced or finish is not None
                yield {"index": i, "text": text, "logprobs": blocks[i] if blocks else None, "finish_reason": finish}

    steps = generator.stream(rows, req.max_tokens, samplings) if req.max_tokens else None  # engine rows are
    # submitted here, before the first entry
    try:
        if req.echo:
            yield from choices([tokenizer.decode(p) for p in rows], echo=True)
        for new in steps or ():
            yield from choices([s.push(t) for s, t in zip(streams, new)])
            if all(s.finish for s in streams):
                break
    finally:
        if steps is not None:
            steps.close()  # a client that left stops its rows
    yield from choices([s.close() for s in streams])
    yield {"usage": sum(len(s.ids) for s in streams)}


async def _json_body(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise CompletionError("the request body is not valid JSON") from None


def completions_router(generator, tokenizer, model_name: str = "minimind", *, batch_size: int = 8,
                       read_body: Callable[[Request], Awaitable[Any]] | None = None,
                       engine: Engine | None = None, stall_s: float = STALL_S) -> APIRouter:
    """``POST /v1/completions`` over ``generator`` (its params also feed the prompt scorer). With ``engine``
    (the server's), the rows are decoded on its slots, sharing them, its queue and its limits (429 / 503 /
    504) with the chat requests, and prompt + ``max_tokens`` must fit its ``cache_len``; without, one request
    at a time runs on ``generator``. ``read_body`` reads and parses a request's JSON (the server passes its
    size-limited reader); prompts are tokenised off the event loop. A stream that its client does not read for
    ``stall_s`` seconds (the connection's buffers full) has its rows cancelled (:class:`~minimind_jax.sse.EventStream`)."""
    read_body = read_body or _json_body
    router = APIRouter()
    scorers: list[Scorer] = []  # built on first use: a scripted test generator has no params
    # one completion at a time on the generator; the engine schedules its own rows
    lock = asyncio.Lock() if engine is None else contextlib.nullcontext()
    rows = generator if engine is None else EngineRows(engine)
    context = generator.config.max_position_embeddings if engine is None else engine.decoder.cache_len

    def scorer() -> Scorer:
        if not scorers:
            scorers.append(Scorer(generator.params, generator.config, generator.policy, batch_size=batch_size))
        return scorers[0]

    @router.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = await read_body(request)
            req = await asyncio.to_thread(parse_completion_request, body, tokenizer, generator.config.vocab_size,
                                          context)
        except CompletionError as e:
            return JSONResponse(e.body(), status_code=e.status)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name, "system_fingerprint": None}
        prompt_tokens = sum(len(p) for p in req.prompts)
        row_scorer = scorer() if req.logprobs is not None else None
        try:
            if req.stream:
                chunks = stream_completion(req, rows, row_scorer, tokenizer)
                first = None if engine is None else await asyncio.to_thread(next, chunks)  # submits the rows
                return EventStream(_sse(chunks, head, prompt_tokens, req.include_usage, lock, first),
                                   on_stall=functools.partial(_stop, chunks), stall_s=stall_s)
            if engine is None:
                async with lock:
                    choices, completion_tokens = await asyncio.to_thread(complete, req, rows, row_scorer, tokenizer)
            else:
                done = await _unless_client_leaves(request, complete, req, rows, row_scorer, tokenizer)
                if done is None:
                    return Response(status_code=499)  # nobody reads it: the rows were cancelled
                choices, completion_tokens = done
        except EngineError as e:
            error = CompletionError.from_engine(e)
            return JSONResponse(error.body(), status_code=error.status)
        return {**head, "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}

    return router


async def _unless_client_leaves(request: Request, complete_fn, req, rows, scorer, tokenizer, poll_s: float = 0.25):
    """``complete_fn(...)`` on engine rows in a thread; a client that disconnects meanwhile cancels its rows
    (their slots are freed at the next step) and gets None."""
    streams: list = []
    work = asyncio.ensure_future(asyncio.to_thread(complete_fn, req, rows, scorer, tokenizer,
                                                   on_stream=streams.append))
    while True:
        finished, _ = await asyncio.wait({work}, timeout=poll_s)
        if finished:
            return work.result()
        if await request.is_disconnected():
            for stream in streams:
                stream.cancel()
            with contextlib.suppress(Exception):  # the cancelled rows end; their result is not wanted
                await work
            return None


def _stop(chunks: Iterator[dict]) -> None:
    """End a stream's rows (its client stopped reading: no entry is being computed meanwhile)."""
    with contextlib.suppress(ValueError):  # "already executing"
        chunks.close()


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _sse(chunks: Iterator[dict], head: dict, prompt_tokens: int, include_usage: bool, lock,
               first: dict | None = None):
    """Server-Sent Events of a stream (its ``first`` entry already computed, or None): a chunk per choice
    entry, the usage chunk if asked, ``[DONE]``. Each entry is computed off the event loop, holding ``lock``;
    a failure mid-stream is sent as an error event."""
    try:
        async with lock:
            while True:
                try:
                    if first is not None:
                        entry, first = first, None
                    else:
                        entry = await asyncio.to_thread(next, chunks, None)
                except Exception as e:  # noqa: BLE001 - the client gets the error in the stream it is reading
                    yield _event({"error": {"message": f"generation failed: {e}", "type": "server_error",
                                            "param": None, "code": "generation_failed"}})
                    break
                if entry is None:
                    break
                if "usage" in entry:
                    if include_usage:
                        yield _event({**head, "choices": [], "usage": _usage(prompt_tokens, entry["usage"])})
                    break
                yield _event({**head, "choices": [entry], **({"usage": None} if include_usage else {})})
        yield "data: [DONE]\n\n"
    finally:
        with contextlib.suppress(ValueError):  # "already executing": an entry is being computed in its thread
            chunks.close()  # a client that left stops its engine rows
