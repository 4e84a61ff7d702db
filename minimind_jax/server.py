"""An OpenAI-compatible chat server over :class:`~minimind_jax.generate.Generator` (FastAPI + uvicorn).

``create_app(generator, tokenizer, model_name)`` returns the FastAPI app; ``scripts/serve_openai_api.py``
is the command line around it.

Endpoints: ``POST /v1/chat/completions`` (plain JSON or Server-Sent Events with ``"stream": true``),
``GET /v1/models``, ``GET /health`` (model name, parameter count, requests waiting, slots and slots in use,
tokens/s over the last 10 s), and the chat page at
``GET /`` (static HTML/CSS/JS in ``minimind_jax/static``: streamed replies, thinking shown apart and
collapsible, a stop button that aborts the request, which cancels its row). A request naming another
``model`` than the served one gets 404 ``model_not_found`` (``any_model_name``: any name is answered).

**Batching.** Every request becomes a :class:`Job` on one :class:`~minimind_jax.engine.Engine`: a fixed
number of decode slots (``max_batch``) over one preallocated KV cache (``cache_len`` tokens per slot), decoded
one step at a time by a worker thread. A request is prefilled into a free slot and joins the running decode
at the next step; each slot has its own sampling settings, seed, token limit and stop strings, and its
tokens for a given seed are those it would get alone. Its new tokens become text deltas as they come and go
to that request's client; a finished row (eos, its limit, a stop string, a disconnected client) frees its
slot at once for the next request waiting. ``/v1/completions`` rows (:mod:`minimind_jax.completions`) run
on the same slots and queue.

**What a request may say.** ``messages`` (roles system / developer / user / assistant / tool, text content
or text parts, assistant ``tool_calls``), ``temperature`` (0 = greedy), ``top_p``, ``max_tokens`` /
``max_completion_tokens``, ``stop``, ``seed``, ``tools`` / ``tool_choice`` (``"none"`` drops the tools, any
other choice acts as ``"auto"``), ``stream`` / ``stream_options.include_usage``; as extensions ``top_k``,
``repetition_penalty`` (MiniMind's sampling) and ``chat_template_kwargs`` with only ``open_thinking`` /
``enable_thinking`` (booleans: the generation prompt opens ``<think>``); any other template variable, a
client's own ``chat_template`` among them, is refused.
``n`` (1-8 choices; choice i samples with seed + i, so each is the answer that seed gives alone),
``logprobs`` / ``top_logprobs`` (0-20); ``presence_penalty``, ``frequency_penalty``, ``user`` and the like are
accepted and ignored; JSON ``response_format`` is refused.

**The answer.** The text is cut at the first stop string; ``<think>`` reasoning goes to
``reasoning_content`` (see :mod:`minimind_jax.chat_format`); when the request had ``tools``,
``<tool_call>`` blocks become ``tool_calls`` (``finish_reason: "tool_calls"``). ``usage`` counts the prompt
and every generated token of every choice (the eos included). With ``logprobs``, each choice has OpenAI's
``logprobs.content``: one ``{token, logprob, bytes, top_logprobs}`` entry per generated token (the eos a reply
ended on left out), the log-probs being the model's own distribution (log-softmax of its logits, before
temperature, top-p and penalties) scored by a forward pass of prompt + reply
(:class:`~minimind_jax.evaluation.scoring.Scorer`); a stream sends a choice's ``logprobs`` with its last
chunk (the one with its ``finish_reason``). Streamed chunks carry their choice's ``index``.

**Limits.** A body over ``max_body_bytes`` (8 MiB) gets 413 before it is read whole; JSON parsing and
tokenising run off the event loop, and a prompt whose text has more bytes than the token limit could ever
cover is refused before it is tokenised; the prompt may hold at most ``max_prompt_tokens`` (default: the
context less one) tokens and prompt + ``max_tokens`` must fit the context (the model's, or the smaller
``cache_len``; 400 ``context_length_exceeded`` naming the limit). At most ``max_queue`` requests wait for a
slot (beyond: 429 ``queue_full``); one not done within ``request_timeout_s`` ends with 504 ``timeout``;
while the server shuts down requests get 503 ``shutting_down``. A non-streaming client that disconnects
cancels its row (checked every 0.25 s); a streaming one as soon as the server sees its connection close, and
one that stops reading its stream once the connection's buffers are full and nothing has gone through for
``stream_stall_s`` (15 s) seconds (:mod:`minimind_jax.sse`).

**Errors.** Invalid requests get ``4xx`` with ``{"error": {"message", "type", "param", "code"}}``; a
failure inside a decode step answers every running request with ``500`` (or an ``error`` event if its
stream had started; a failed prefill only its own request), empties the slots and goes on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import importlib.resources
import json
import logging
import queue
import secrets
import time
import uuid
from collections.abc import Sequence
from contextlib import asynccontextmanager
from typing import Any

import jax
import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from minimind_jax.chat_format import ReasoningSplitter, StopStrings, ToolCallBuffer, prompt_opens_reasoning
from minimind_jax.completions import completions_router
from minimind_jax.engine import CHUNK_SCORES, CHUNK_TOKENS, Engine, EngineError, SlotDecoder
from minimind_jax.engine import Request as EngineRequest
from minimind_jax.evaluation.scoring import MAX_TOP_LOGPROBS, Scorer
from minimind_jax.generate import SamplingParams, TextStream
from minimind_jax.sse import STALL_S, EventStream
from minimind_jax.tokenizer import TokenizerError

__all__ = ["APIError", "ChatRequest", "Job", "PromptBuilder", "create_app", "parse_chat_request"]

log = logging.getLogger("minimind_jax.server")

_ROLES = {"system", "developer", "user", "assistant", "tool"}
_MAX_STOP = 16
MAX_CHOICES = 8  # the most choices (``n``) one request may ask for
TEMPLATE_KWARGS = ("open_thinking", "enable_thinking")  # the only chat_template_kwargs a request may set
MAX_BODY_BYTES = 8 * 2 ** 20


class APIError(Exception):
    """An error answered as OpenAI's ``{"error": {...}}`` JSON with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# ------------------------------------------------------------------------------------------------ requests


@dataclasses.dataclass
class ChatRequest:
    """A validated ``/v1/chat/completions`` body."""

    messages: list[dict]
    sampling: SamplingParams
    max_tokens: int | None  # None: the server's default (capped by the context left)
    stop: list[str]
    stream: bool = False
    include_usage: bool = False
    tools: list[dict] | None = None  # None: no tools (also for tool_choice "none")
    template_kwargs: dict = dataclasses.field(default_factory=dict)
    n: int = 1  # choices; choice i samples with seed + i
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives per token (with logprobs)

    def choice_sampling(self, i: int) -> SamplingParams:
        """The sampling settings of choice ``i``: the request's, with seed + i."""
        return dataclasses.replace(self.sampling, seed=(self.sampling.seed + i) % 2 ** 32)


def _number(body: dict, key: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise _bad(f"{key} must be a number, got {value!r}", key, "invalid_type")
    if value < lo or value > hi or (lo_open and value == lo):
        low = f"({lo}" if lo_open else f"[{lo}"
        raise _bad(f"{key} must be in {low}, {hi}], got {value}", key)
    return float(value)


def _integer(body: dict, key: str, lo: int, hi: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{key} must be an integer, got {value!r}", key, "invalid_type")
    if value < lo or (hi is not None and value > hi):
        bounds = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise _bad(f"{key} must be {bounds}, got {value}", key)
    return value


def _text_content(content: Any, param: str) -> str:
    """A message's content as text: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{param}[{j}]: only text content parts ({{\"type\": \"text\", \"text\": ...}}) are "
                           "supported", f"{param}[{j}]")
            texts.append(part["text"])
        return "\n".join(texts)
    raise _bad(f"{param} must be a string or a list of text parts, got {type(content).__name__}", param,
               "invalid_type")


def _message(m: Any, i: int) -> dict:
    p = f"messages[{i}]"
    if not isinstance(m, dict):
        raise _bad(f"{p} must be an object with 'role' and 'content'", p, "invalid_type")
    role = m.get("role")
    if role not in _ROLES:
        raise _bad(f"{p}.role must be one of {', '.join(sorted(_ROLES))}, got {role!r}", f"{p}.role")
    out = {"role": "system" if role == "developer" else role}
    content = m.get("content")
    tool_calls = m.get("tool_calls")
    if content is None:
        if not (role == "assistant" and tool_calls):
            raise _bad(f"{p}.content is required", f"{p}.content", "missing_required_parameter")
    else:
        out["content"] = _text_content(content, f"{p}.content")
    if role == "assistant":
        if tool_calls is not None:
            if not isinstance(tool_calls, list) or not all(
                    isinstance(c, dict) and isinstance(c.get("function"), dict)
                    and isinstance(c["function"].get("name"), str) for c in tool_calls):
                raise _bad(f"{p}.tool_calls must be a list of {{\"function\": {{\"name\", \"arguments\"}}}}",
                           f"{p}.tool_calls")
            out["tool_calls"] = tool_calls
        for key in ("reasoning_content", "reasoning", "thinking"):
            if isinstance(m.get(key), str):
                out["reasoning_content"] = m[key]
                break
    for key in ("name", "tool_call_id"):
        if isinstance(m.get(key), str):
            out[key] = m[key]
    return out


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a chat-completions body; raises :class:`APIError` (400) naming the offending field."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None, "invalid_type")
    messages = body.get("messages")
    if messages is None:
        raise _bad("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages")
    messages = [_message(m, i) for i, m in enumerate(messages)]
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise _bad("'model' must be a string", "model", "invalid_type")

    sampling = _sampling(body)

    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)

    stop = _stop_strings(body)

    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise _bad("'stream' must be a boolean", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")

    n = _integer(body, "n", 1, MAX_CHOICES) or 1
    logprobs, top_logprobs = _logprobs_settings(body)
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise _bad("only response_format {\"type\": \"text\"} is supported", "response_format", "unsupported_value")

    tools = _tools(body)

    template_kwargs = _template_kwargs(body.get("chat_template_kwargs"))
    if "enable_thinking" in template_kwargs:  # Qwen's name for the same switch
        template_kwargs.setdefault("open_thinking", template_kwargs.pop("enable_thinking"))

    return ChatRequest(messages=messages, sampling=sampling, max_tokens=max_tokens, stop=[s for s in stop if s],
                       stream=bool(stream), include_usage=bool(options.get("include_usage")), tools=tools,
                       template_kwargs=template_kwargs, n=n, logprobs=logprobs, top_logprobs=top_logprobs)


def _sampling(body: dict) -> SamplingParams:
    """The request's sampling settings (temperature 0 or top_p 0 = greedy; no seed = a random one)."""
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    top_k = _integer(body, "top_k", 0, 2 ** 31 - 1)
    penalty = _number(body, "repetition_penalty", 0.0, float("inf"), lo_open=True)
    _number(body, "presence_penalty", -2.0, 2.0)
    _number(body, "frequency_penalty", -2.0, 2.0)
    seed = _integer(body, "seed", -(2 ** 63), 2 ** 64 - 1)
    defaults = SamplingParams()
    greedy = temperature == 0 or top_p == 0
    return SamplingParams(
        temperature=defaults.temperature if temperature is None else temperature,
        top_p=1.0 if greedy else (defaults.top_p if top_p is None else top_p),
        top_k=top_k or 0, repetition_penalty=penalty or 1.0, greedy=greedy,
        seed=(secrets.randbits(32) if seed is None else seed % 2 ** 32))


def _stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)) or len(stop) > _MAX_STOP:
        raise _bad(f"'stop' must be a string or a list of at most {_MAX_STOP} strings", "stop")
    return stop


def _tools(body: dict) -> list | None:
    """The request's tools (None when there are none or ``tool_choice`` is "none")."""
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise _bad("'tools' must be a list of objects", "tools", "invalid_type")
        tools = tools or None
    tool_choice = body.get("tool_choice")
    if tool_choice == "none":
        tools = None
    return tools


def _logprobs_settings(body: dict) -> tuple[bool, int]:
    """(logprobs, top_logprobs) of the request; top_logprobs needs logprobs: true (as OpenAI answers)."""
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise _bad(f"'logprobs' must be a boolean, got {logprobs!r}", "logprobs", "invalid_type")
    top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise _bad("'top_logprobs' requires 'logprobs': true", "top_logprobs")
    return bool(logprobs), top or 0


def _template_kwargs(value: Any) -> dict:
    """Only the thinking switch reaches the chat template: a client may not pass a template of its own
    (``chat_template``), nor any other template variable."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad("'chat_template_kwargs' must be an object", "chat_template_kwargs", "invalid_type")
    for key, flag in value.items():
        if key not in TEMPLATE_KWARGS:
            raise _bad(f"chat_template_kwargs.{key} is not supported (allowed: {', '.join(TEMPLATE_KWARGS)})",
                       f"chat_template_kwargs.{key}", "unsupported_value")
        if not isinstance(flag, bool):
            raise _bad(f"chat_template_kwargs.{key} must be a boolean", f"chat_template_kwargs.{key}", "invalid_type")
    return dict(value)


# ------------------------------------------------------------------------------------------------ jobs


class Job(EngineRequest):
    """One chat request in the engine: its prompt, limits and settings, the text handling of its tokens (deltas
    with a partial UTF-8 character held back, cut at stop strings, split into reasoning and content, tool calls
    held back and parsed) and the channel its events go back on.

    Events (tuples, in order): ``("start",)`` after the prefill; any number of
    ``("delta", reasoning, content)``; then ``("done", finish_reason, tool_calls, has_reasoning,
    completion_tokens)`` or ``("error", APIError)``. A cancelled job (its client left) sends nothing more.
    """

    def __init__(self, prompt_ids: Sequence[int], max_tokens: int, sampling: SamplingParams, tokenizer, *,
                 stop: Sequence[str] = (), parse_tools: bool = False, start_in_reasoning: bool = False,
                 stream: bool = False, loop: asyncio.AbstractEventLoop | None = None):
        super().__init__(prompt_ids, max_tokens, sampling)
        self.stream = stream
        self.text = TextStream(tokenizer, skip_special_tokens=True)
        self.stops = StopStrings(list(stop))
        self.splitter = ReasoningSplitter(start_in_reasoning)
        self.tools = ToolCallBuffer() if parse_tools else None
        self._loop = loop
        self.events: asyncio.Queue | queue.Queue = asyncio.Queue() if loop is not None else queue.Queue()

    def send(self, *event) -> None:
        """Called from the engine's thread."""
        if self._loop is None:
            self.events.put(event)
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)

    # -- the engine's hooks
    def on_start(self) -> None:
        self.send("start")

    def on_token(self, token: int, is_eos: bool) -> bool:
        if not is_eos:
            self._text(self.text.push([token]))
        return self.stops.stopped

    def on_finish(self, reason: str) -> None:
        if reason == "cancelled":
            return
        tail = "" if self.stops.stopped else self.text.flush()
        calls = self._text(tail, final=True)
        self.send("done", "tool_calls" if calls else reason, calls, self.splitter.has_reasoning, len(self.tokens))

    def on_error(self, error: EngineError) -> None:
        self.send("error", api_error(error))

    def _text(self, delta: str, final: bool = False) -> list[dict]:
        delta = self.stops.feed(delta) + (self.stops.finish() if final else "")
        reasoning, content = self.splitter.feed(delta)
        if final:
            r, c = self.splitter.finish()
            reasoning, content = reasoning + r, content + c
        calls = []
        if self.tools is not None:
            content = self.tools.feed(content)
            if final:
                rest, calls = self.tools.finish()
                content += rest
        if reasoning or content:
            self.send("delta", reasoning, content)
        return calls


def api_error(error: EngineError) -> APIError:
    """The HTTP answer to an engine's refusal (429 queue full, 503 shutting down, 400 too long)."""
    return APIError(error.status, error.message, code=error.code,
                    type="rate_limit_error" if error.status == 429 else None)


def default_eos_ids(generator, tokenizer) -> tuple[int, ...]:
    """The generator's eos ids and the tokenizer's eos token (a reply ends on either)."""
    eos_ids = list(generator.eos_ids)
    tok_eos = tokenizer.special_tokens_map.get("eos_token")
    tok_eos = tokenizer.token_to_id(tok_eos) if tok_eos else None
    if tok_eos is not None and tok_eos not in eos_ids:
        eos_ids.append(tok_eos)
    return tuple(eos_ids)


# ------------------------------------------------------------------------------------------------ logprobs


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's ``bytes_to_unicode``), inverted: the character that spells a byte in a
    token's name -> the byte."""
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
             *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars = dict(zip(shown, shown))
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + len(chars) - len(shown)
    return {chr(c): b for b, c in chars.items()}


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The UTF-8 bytes a token stands for (a byte-level token may hold part of a character); an added token
    (``<think>``, ``<|im_end|>``) is its own text."""
    name = tokenizer.id_to_token(int(token_id)) or ""
    alphabet = _byte_alphabet()
    if int(token_id) in tokenizer.added_tokens_decoder or not all(ch in alphabet for ch in name):
        return name.encode("utf-8")
    return bytes(alphabet[ch] for ch in name)


class ReplyScorer:
    """OpenAI's chat ``logprobs.content`` of replies: a forward pass of prompt + reply on a
    :class:`~minimind_jax.evaluation.scoring.Scorer` (built on first use, one row per pass), so each log-prob
    is the model's own (before temperature, top-p and penalties). The eos a reply ended on is left out."""

    def __init__(self, generator, tokenizer, eos_ids: Sequence[int]):
        self.generator, self.tokenizer, self.eos = generator, tokenizer, set(eos_ids)
        self._scorer: Scorer | None = None

    def _entry(self, token_id: int, logprob: float) -> dict:
        raw = token_bytes(self.tokenizer, token_id)
        return {"token": raw.decode("utf-8", "replace"), "logprob": float(logprob), "bytes": list(raw)}

    def content(self, prompt: Sequence[int], replies: Sequence[Sequence[int]], top: int) -> list[list[dict]]:
        """For each reply (its generated ids): one entry per token, with its ``top`` best alternatives."""
        if self._scorer is None:
            g = self.generator
            self._scorer = Scorer(g.params, g.config, g.policy, batch_size=1)
        replies = [list(r[:-1]) if r and r[-1] in self.eos else list(r) for r in replies]
        todo = [i for i, r in enumerate(replies) if r]
        scores = self._scorer.score([list(prompt) + replies[i] for i in todo], top=MAX_TOP_LOGPROBS if top else 0)
        out = [[] for _ in replies]
        for i, sc in zip(todo, scores):
            start = len(prompt) - 1  # scores index i is about token i + 1
            out[i] = [{**self._entry(t, sc.logprobs[start + j]),
                       "top_logprobs": [self._entry(a, lp) for a, lp in sc.top[start + j][:top]] if top else []}
                      for j, t in enumerate(replies[i])]
        return out


# ------------------------------------------------------------------------------------------------ prompts


class PromptBuilder:
    """Turns a :class:`ChatRequest` into (prompt ids, max new tokens, whether the prompt opened a think block)
    within ``context`` tokens (the engine's slot length: at most the model's context); raises
    :class:`APIError` (400) for a template error or a prompt that does not fit (or ``max_prompt_tokens``).
    Runs off the event loop: tokenising a long prompt takes a while."""

    def __init__(self, tokenizer, context: int, model_context: int, default_max_tokens: int,
                 max_prompt_tokens: int | None = None):
        self.tokenizer = tokenizer
        self.context = context
        self.model_context = model_context
        self.default_max_tokens = default_max_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self._max_token_bytes: int | None = None  # the tokenizer's longest token, in bytes (found when first needed)

    def _context_name(self) -> str:
        if self.context == self.model_context:
            return f"this model's context of {self.context} tokens"
        return f"the server's context of {self.context} tokens (the model's is {self.model_context})"

    def __call__(self, request: ChatRequest) -> tuple[list[int], int, bool]:
        context, cap = self.context, self.max_prompt_tokens
        limit = min(context - 1, cap or context)
        self._refuse_hopeless(request, limit)
        try:
            ids = self.tokenizer.apply_chat_template(
                request.messages, add_generation_prompt=True, tools=request.tools, tokenize=True,
                sanitize_control_tokens=True, **request.template_kwargs)
        except (TokenizerError, TypeError, jinja2.TemplateError) as e:
            raise _bad(f"cannot apply the chat template to these messages: {e}", "messages") from e
        n = len(ids)
        if n > limit:
            raise _bad(f"the prompt is {n} tokens; the limit is {limit} ({self._context_name()}"
                       f"{', --max-prompt-tokens ' + str(cap) if cap else ''})", "messages", "context_length_exceeded")
        if request.max_tokens is None:
            max_tokens = min(self.default_max_tokens, context - n)
        elif n + request.max_tokens > context:
            raise _bad(f"the prompt ({n} tokens) plus max_tokens ({request.max_tokens}) exceeds "
                       f"{self._context_name()}", "max_tokens", "context_length_exceeded")
        else:
            max_tokens = request.max_tokens
        opened = prompt_opens_reasoning(self.tokenizer.decode(ids[-16:]))
        return ids, max_tokens, opened

    def _refuse_hopeless(self, request: ChatRequest, limit: int) -> None:
        """A prompt whose text has more bytes than ``limit`` tokens can ever cover (no token is longer than the
        tokenizer's longest, in bytes) is refused before it is tokenised."""
        if self._max_token_bytes is None:
            self._max_token_bytes = max(map(len, self.tokenizer.get_vocab()))
        size = sum(len(str(m.get("content") or "").encode("utf-8", "surrogatepass")) for m in request.messages)
        if size > limit * self._max_token_bytes:
            raise _bad(f"the prompt's text is {size} bytes: more than the limit of {limit} tokens can hold",
                       "messages", "context_length_exceeded")


# ------------------------------------------------------------------------------------------------ the app


def _parameter_count(generator) -> int | None:
    """The number of parameters the generator serves (None when it holds no params tree)."""
    params = getattr(generator, "params", None)
    if params is None:
        return None
    return int(sum(getattr(leaf, "size", 0) for leaf in jax.tree_util.tree_leaves(params)))


async def read_body(request: Request, limit: int) -> Any:
    """The request's JSON body, refused with 413 once it passes ``limit`` bytes (by its Content-Length, or while
    it streams in) and parsed off the event loop."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise APIError(413, f"the request body is {int(length)} bytes; the limit is {limit}", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is over the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    try:
        return await asyncio.to_thread(json.loads, b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        reason = "too deeply nested" if isinstance(e, RecursionError) else str(e)
        raise APIError(400, f"the request body is not valid JSON: {reason}", code="invalid_json") from None


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


async def next_event(job: Job, request: Request, poll_s: float = 0.25):
    """The job's next event; a client that has gone away cancels the job (its row stops at the next step). The
    connection is checked every ``poll_s`` seconds, also while events keep coming."""
    while True:
        now = time.monotonic()
        if now - getattr(request.state, "disconnect_checked", -poll_s) >= poll_s:
            request.state.disconnect_checked = now
            if await request.is_disconnected():
                job.cancelled = True
                raise ClientGone
        try:
            return await asyncio.wait_for(job.events.get(), timeout=poll_s)
        except asyncio.TimeoutError:
            continue


def _widen_default_executor(threads: int) -> None:
    """Requests wait on the engine in threads (``asyncio.to_thread``: a whole non-streamed completion, a stream's
    next token). The loop's default pool has cpu_count + 4 of them (6 on 2 cores), so a few long requests would
    hold up the parsing and rendering of every new one: give it a thread for every request the engine can hold
    (queue and slots), and some to spare."""
    asyncio.get_running_loop().set_default_executor(
        concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="minimind-http"))


def create_app(generator, tokenizer, model_name: str = "minimind", *, max_batch: int = 8,
               default_max_tokens: int = 1024, eos_ids: Sequence[int] | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, max_prompt_tokens: int | None = None, max_queue: int = 64,
               request_timeout_s: float | None = None, cache_len: int | None = None, decoder=None,
               warm_up: bool = False, stream_stall_s: float = STALL_S, prefill_chunk: int = CHUNK_TOKENS,
               prefill_chunk_scores: int = CHUNK_SCORES, any_model_name: bool = False):
    """The FastAPI app serving ``generator`` (a :class:`~minimind_jax.generate.Generator`) with ``tokenizer``'s
    chat template. Chat completions run on an :class:`~minimind_jax.engine.Engine` over ``decoder`` (default: a
    :class:`~minimind_jax.engine.SlotDecoder` of ``max_batch`` slots of ``cache_len`` tokens (default the model's
    context), chunking prompts over ``prefill_chunk`` tokens within ``prefill_chunk_scores``); its thread starts
    and stops with the app; ``app.state.engine`` is the engine. ``max_queue`` requests may wait for a slot (then
    429), a request not done within ``request_timeout_s`` gets 504; ``warm_up`` compiles every decode shape at
    start. Bodies over ``max_body_bytes`` get 413, prompts over ``max_prompt_tokens`` (default: the context) 400,
    another ``model`` than ``model_name`` 404 (unless ``any_model_name``). A stream whose client reads nothing
    for ``stream_stall_s`` s once the buffers are full is cancelled (:class:`~minimind_jax.sse.EventStream`)."""
    vocab = generator.config.vocab_size
    if len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {vocab}")
    if decoder is None:
        decoder = SlotDecoder.for_generator(generator, slots=max_batch, cache_len=cache_len,
                                            chunk_tokens=prefill_chunk, chunk_scores=prefill_chunk_scores)
    engine = Engine(decoder, eos_ids if eos_ids is not None else default_eos_ids(generator, tokenizer),
                    max_queue=max_queue, timeout_s=request_timeout_s, warm_up=warm_up)
    prompts = PromptBuilder(tokenizer, decoder.cache_len, generator.config.max_position_embeddings,
                            default_max_tokens, max_prompt_tokens)
    scorer = ReplyScorer(generator, tokenizer, engine.eos_ids)

    @asynccontextmanager
    async def lifespan(app):
        _widen_default_executor(max_queue + engine.decoder.slots + 16)
        engine.start()
        try:
            yield
        finally:
            engine.close()

    app = FastAPI(title="minimind-jax", lifespan=lifespan)
    app.state.engine = engine
    _error_handlers(app)
    body_of = functools.partial(_read_request, max_body_bytes=max_body_bytes, model_name=model_name,
                                any_name=any_model_name)
    app.include_router(completions_router(generator, tokenizer, model_name, batch_size=max_batch, engine=engine,
                                          read_body=body_of, stall_s=stream_stall_s))
    _pages(app, model_name, _parameter_count(generator), engine)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_chat_request(await body_of(request))
        prompt_ids, max_tokens, opened = await asyncio.to_thread(prompts, req)
        jobs = [Job(prompt_ids, max_tokens, req.choice_sampling(i), tokenizer, stop=req.stop,
                    parse_tools=req.tools is not None, start_in_reasoning=opened, stream=req.stream,
                    loop=asyncio.get_running_loop()) for i in range(req.n)]
        await _start(engine, jobs, request)
        answer = _Answer(req, jobs, model_name, scorer)
        if not req.stream:
            return await answer.whole(request)
        return EventStream(answer.events(), on_stall=lambda: _cancel(jobs), stall_s=stream_stall_s)

    return app


async def _read_request(request: Request, *, max_body_bytes: int, model_name: str, any_name: bool) -> Any:
    """The request's JSON body (:func:`read_body`), unless it names a model other than the served one
    (OpenAI's 404 ``model_not_found``)."""
    body = await read_body(request, max_body_bytes)
    asked = body.get("model") if isinstance(body, dict) else None
    if isinstance(asked, str) and asked != model_name and not any_name:
        raise APIError(404, f"the model {asked[:100]!r} does not exist: this server serves {model_name!r} (GET "
                            "/v1/models; or start it with --any-model-name)", param="model", code="model_not_found")
    return body


async def _start(engine: Engine, jobs: list[Job], request: Request) -> None:
    """Submit the choices' jobs and wait until each is prefilled; a refusal or an error cancels them all."""
    try:
        for job in jobs:
            engine.submit(job)
        for job in jobs:
            first = await next_event(job, request)
            if first[0] == "error":
                raise first[1]
    except EngineError as e:
        _cancel(jobs)
        raise api_error(e) from None
    except BaseException:
        _cancel(jobs)
        raise


def _cancel(jobs: list[Job]) -> None:
    for job in jobs:
        job.cancelled = True  # a no-op once the job is done; frees its slot otherwise


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(ClientGone)
    async def _client_gone(request, exc):
        return JSONResponse(APIError(499, "the client closed the connection").body(), status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        error = APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(error.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):
        log.exception("unexpected error")
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {exc}").body(), status_code=500)


def _pages(app: FastAPI, model_name: str, parameters: int | None, engine: Engine) -> None:
    """The chat page, its static files, ``/health`` and ``/v1/models``."""
    created = int(time.time())
    static = importlib.resources.files("minimind_jax") / "static"
    pages = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}

    @app.get("/")
    async def chat_page():
        return FileResponse(str(static / "index.html"), media_type="text/html")

    @app.get("/static/{name}")
    async def static_file(name: str):
        if name not in pages:
            raise APIError(404, f"no static file {name!r}", code="not_found")
        return FileResponse(str(static / name), media_type=pages[name])

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "parameters": parameters, "queued": engine.queued,
                "slots": len(engine.slots), "slots_in_use": engine.slots_in_use,
                "tokens_per_s": round(engine.tokens_per_s(), 1)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "minimind-jax"}]}


class _Answer:
    """Started jobs' answer (one job per choice): one chat.completion (``whole``) or its Server-Sent Events
    (``events``, each chunk naming its choice's ``index``)."""

    def __init__(self, req: ChatRequest, jobs: list[Job], model_name: str, scorer: ReplyScorer):
        self.req, self.jobs, self.model, self.scorer = req, jobs, model_name, scorer
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def usage(self, completion: int) -> dict:
        n = len(self.jobs[0].prompt_ids)
        return {"prompt_tokens": n, "completion_tokens": completion, "total_tokens": n + completion}

    async def logprobs(self, jobs: list[Job]) -> list[dict | None]:
        """The ``logprobs`` of each job's choice (None each without ``logprobs``), scored off the event loop."""
        if not self.req.logprobs:
            return [None] * len(jobs)
        content = await asyncio.to_thread(self.scorer.content, jobs[0].prompt_ids, [j.tokens for j in jobs],
                                          self.req.top_logprobs)
        return [{"content": c, "refusal": None} for c in content]

    async def whole(self, request: Request) -> dict:
        try:
            ends = [await self._collect(job, request) for job in self.jobs]
            logprobs = await self.logprobs(self.jobs)
        except BaseException:
            _cancel(self.jobs)
            raise
        choices = []
        for index, ((reasoning, content, end), lp) in enumerate(zip(ends, logprobs)):
            _, finish, calls, has_reasoning, _ = end
            message = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
                message["content"] = message["content"] or None
            if has_reasoning:
                message["reasoning_content"] = reasoning
            choices.append({"index": index, "message": message, "logprobs": lp, "finish_reason": finish})
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices, "usage": self.usage(sum(e[4] for *_, e in ends))}

    @staticmethod
    async def _collect(job: Job, request: Request) -> tuple[str, str, tuple]:
        """(reasoning, content, the done event) of one job."""
        reasoning, content = [], []
        while True:
            event = await next_event(job, request)
            if event[0] == "delta":
                reasoning.append(event[1])
                content.append(event[2])
            elif event[0] == "error":
                raise event[1]
            else:
                return "".join(reasoning), "".join(content), event

    def chunk(self, index: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "system_fingerprint": None,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        if self.req.include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def _merged(self):
        """(choice index, event) of every job as they come, until each job has ended."""
        merged: asyncio.Queue = asyncio.Queue()

        async def forward(index: int, job: Job) -> None:
            while True:
                event = await job.events.get()
                await merged.put((index, event))
                if event[0] != "delta":
                    return

        tasks = [asyncio.create_task(forward(i, job)) for i, job in enumerate(self.jobs)]
        try:
            for _ in self.jobs:
                while True:
                    index, event = await merged.get()
                    yield index, event
                    if event[0] != "delta":
                        break
        finally:
            for task in tasks:
                task.cancel()

    async def events(self):
        completion, merged = 0, self._merged()
        try:
            for index in range(len(self.jobs)):
                yield self.chunk(index, {"role": "assistant", "content": ""})
            async for index, event in merged:
                if event[0] == "delta":
                    delta = {}
                    if event[1]:
                        delta["reasoning_content"] = event[1]
                    if event[2]:
                        delta["content"] = event[2]
                    yield self.chunk(index, delta)
                elif event[0] == "error":
                    yield f"data: {json.dumps(event[1].body(), ensure_ascii=False)}\n\n"
                    break
                else:
                    _, finish, calls, _, tokens = event
                    completion += tokens
                    if calls:
                        yield self.chunk(index, {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]})
                    (logprobs,) = await self.logprobs([self.jobs[index]])
                    yield self.chunk(index, {}, finish, logprobs)
            else:
                if self.req.include_usage:
                    yield ("data: " + json.dumps({
                        "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                        "model": self.model, "system_fingerprint": None, "choices": [],
                        "usage": self.usage(completion)}) + "\n\n")
            yield "data: [DONE]\n\n"
        finally:
            await merged.aclose()  # stops its forwarding tasks
            _cancel(self.jobs)  # frees the slots of a client that left
