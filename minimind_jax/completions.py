"""OpenAI's legacy completions API (``POST /v1/completions``) with prompt log-probabilities, as lm-eval's
``local-completions`` model uses it: request parsing, prompt scoring on the jitted forward pass
(:class:`~minimind_jax.evaluation.scoring.Scorer`), generation with the :class:`~minimind_jax.generate.Generator`,
and the response.

``prompt`` is a text, a list of texts, a list of token ids or a list of such lists; ``max_tokens`` may be 0 (with
``echo``: score the prompt only); ``logprobs`` (0-20) returns ``tokens``, ``token_logprobs``, ``top_logprobs``
and ``text_offset`` (the first prompt token has no log-prob: ``null``, as OpenAI answers). Errors are OpenAI's
``{"error": {...}}`` with status 400. Streaming is not offered here (``stream: true`` is a 400).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from minimind_jax.evaluation.scoring import MAX_TOP_LOGPROBS, Scorer
from minimind_jax.generate import SamplingParams

__all__ = ["CompletionError", "CompletionRequest", "completions_router", "parse_completion_request"]


class CompletionError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": "invalid_request_error", "param": self.param,
                          "code": "invalid_value"}}


@dataclasses.dataclass
class CompletionRequest:
    prompts: list[list[int]]
    max_tokens: int
    echo: bool
    logprobs: int | None
    n: int
    stop: list[str]
    sampling: SamplingParams


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
    if body.get("stream"):
        raise CompletionError("stream is not supported by /v1/completions here", "stream")
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
    return CompletionRequest(prompts, max_tokens, bool(body.get("echo", False)), logprobs, n, stop, sampling)


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


def complete(req: CompletionRequest, generator, scorer: Scorer, tokenizer) -> tuple[list[dict], int]:
    """The ``choices`` of the response (prompt-major, ``n`` per prompt) and the number of generated tokens."""
    rows = [p for p in req.prompts for _ in range(req.n)]
    samplings = [dataclasses.replace(req.sampling, seed=req.sampling.seed + j) for _ in req.prompts
                 for j in range(req.n)]
    generated = ([r.tokens for r in generator.generate(rows, req.max_tokens, samplings)]
                 if req.max_tokens else [[] for _ in rows])
    need_scores = req.logprobs is not None
    choices = []
    for index, (prompt, new) in enumerate(zip(rows, generated)):
        eos = set(generator.eos_ids)
        finish = "stop" if new and new[-1] in eos else "length"
        text, stopped = _cut(tokenizer.decode([t for t in new if t not in eos]), req.stop)
        finish = "stop" if stopped else finish
        prompt_text = tokenizer.decode(prompt) if req.echo else ""
        logprobs = None
        if need_scores:
            ids = prompt + new  # an eos it stopped on keeps its log-prob, as lm-eval's parser expects
            scores = scorer.score([ids], top=req.logprobs)[0]
            logprobs = _logprobs_block(tokenizer, ids, scores, 0 if req.echo else len(prompt), req.logprobs)
        choices.append({"index": index, "text": prompt_text + text, "logprobs": logprobs, "finish_reason": finish})
    return choices, sum(map(len, generated))


async def _json_body(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise CompletionError("the request body is not valid JSON") from None


def completions_router(generator, tokenizer, model_name: str = "minimind", *, batch_size: int = 8,
                       read_body: Callable[[Request], Awaitable[Any]] | None = None) -> APIRouter:
    """``POST /v1/completions`` over ``generator`` (its params also feed the prompt scorer). ``read_body`` reads
    and parses a request's JSON (the server passes its size-limited reader); prompts are tokenised off the
    event loop."""
    read_body = read_body or _json_body
    router = APIRouter()
    scorers: list[Scorer] = []  # built on first use: a scripted test generator has no params
    lock = asyncio.Lock()  # one completion at a time on the device

    def scorer() -> Scorer:
        if not scorers:
            scorers.append(Scorer(generator.params, generator.config, generator.policy, batch_size=batch_size))
        return scorers[0]

    @router.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = await read_body(request)
            req = await asyncio.to_thread(parse_completion_request, body, tokenizer, generator.config.vocab_size,
                                          generator.config.max_position_embeddings)
        except CompletionError as e:
            return JSONResponse(e.body(), status_code=e.status)
        async with lock:
            choices, completion_tokens = await asyncio.to_thread(complete, req, generator, scorer(), tokenizer)
        prompt_tokens = sum(len(p) for p in req.prompts)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    return router
