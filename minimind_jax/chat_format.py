"""The assistant's output format, shared by the chat CLI and the server: ``<think>`` reasoning and
``<tool_call>`` blocks.

MiniMind's chat template writes an assistant turn as ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}``, and
a tool call as ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` after the answer. Its
generation prompt either closes the think block itself (``<think>\\n\\n</think>\\n\\n``: the model writes the
answer only) or leaves it open (``open_thinking``: the model's text starts *inside* the reasoning and closes
it with ``</think>``).

* :func:`split_reasoning` splits a finished text into (reasoning, answer).
* :class:`ReasoningSplitter` does the same on text deltas as they stream, holding back what could still be
  the start of a tag (``"<thi"``) or whitespace that the split would strip; the deltas it returns add up to
  exactly what :func:`split_reasoning` returns for the whole text.
* :func:`parse_tool_calls` turns ``<tool_call>{json}</tool_call>`` blocks into OpenAI ``tool_calls``;
  :class:`ToolCallBuffer` holds streamed answer text back from the first ``<tool_call>`` on.
* :class:`StopStrings` cuts streamed text at the first of a request's stop strings.

Whitespace: the reasoning is stripped at both ends and the answer after ``</think>`` at its start (the
template's newlines around the tags); an answer without a think block is returned unchanged.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence

__all__ = [
    "THINK_OPEN", "THINK_CLOSE", "TOOL_CALL_OPEN", "TOOL_CALL_CLOSE", "ReasoningSplitter", "StopStrings",
    "ToolCallBuffer", "parse_tool_calls", "prompt_opens_reasoning", "split_reasoning",
]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


def _partial_suffix(text: str, tags: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of one of ``tags`` (text that a later
    delta could complete into a tag, so it must not be shown yet)."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:n]):
                best = n
                break
    return best


def prompt_opens_reasoning(prompt_text: str) -> bool:
    """Whether a rendered prompt ends inside an open think block (MiniMind's ``open_thinking`` generation
    prompt): its last ``<think>`` comes after its last ``</think>``."""
    return prompt_text.rfind(THINK_OPEN) > prompt_text.rfind(THINK_CLOSE)


class ReasoningSplitter:
    """Splits streamed text deltas into (reasoning delta, answer delta).

    ``start_in_reasoning``: the generation prompt already opened ``<think>``, so the text starts inside the
    reasoning. Otherwise a think block is recognised only at the very start of the text (after whitespace);
    a ``</think>`` there closes an empty one (a model that repeats the prompt's closing tag). An unclosed block
    (the text stopped inside it) is all reasoning.

    >>> s = ReasoningSplitter()
    >>> s.feed("<thi"), s.feed("nk>\\nhmm\\n</th"), s.feed("ink>\\n\\nHi"), s.finish()
    (('', ''), ('hmm', ''), ('', 'Hi'), ('', ''))
    """

    _START, _REASONING, _ANSWER_START, _ANSWER = range(4)

    def __init__(self, start_in_reasoning: bool = False):
        self.start_in_reasoning = start_in_reasoning
        self.state = self._START
        self.has_reasoning = False  # a think block was opened (by the text or by the prompt)
        self._buf = ""
        self._reasoning_started = False  # some reasoning text was returned (leading whitespace is gone)

    def feed(self, delta: str) -> tuple[str, str]:
        """Add a text delta; return the (reasoning, answer) text that is now certain."""
        self._buf += delta
        reasoning, answer = [], []
        while True:
            buf = self._buf
            if self.state == self._START:
                rest = buf.lstrip()
                if rest.startswith(THINK_OPEN):
                    self._enter_reasoning(rest[len(THINK_OPEN):])
                    continue
                if rest.startswith(THINK_CLOSE):  # closes an empty block (the prompt's, or an implied one)
                    self._enter_reasoning(rest)
                    continue
                if THINK_OPEN.startswith(rest) or THINK_CLOSE.startswith(rest):  # whitespace or a tag's start
                    break
                if self.start_in_reasoning:
                    self._enter_reasoning(buf)
                else:
                    self.state = self._ANSWER
                continue
            if self.state == self._REASONING:
                end = buf.find(THINK_CLOSE)
                if end >= 0:
                    reasoning.append(self._reasoning_text(buf[:end].rstrip()))
                    self._buf = buf[end + len(THINK_CLOSE):]
                    self.state = self._ANSWER_START
                    continue
                keep = _partial_suffix(buf, [THINK_CLOSE])
                body = buf[: len(buf) - keep]
                shown = body.rstrip()  # trailing whitespace would be stripped if "</think>" came next
                reasoning.append(self._reasoning_text(shown))
                self._buf = buf[len(shown):]
                break
            if self.state == self._ANSWER_START:
                rest = buf.lstrip()
                self._buf = rest
                if not rest:
                    break
                self.state = self._ANSWER
                continue
            answer.append(buf)  # _ANSWER
            self._buf = ""
            break
        return "".join(reasoning), "".join(answer)

    def finish(self) -> tuple[str, str]:
        """The text held back at the end of the stream: an unfinished tag is plain text after all."""
        buf, self._buf = self._buf, ""
        if self.state == self._START:
            if not self.start_in_reasoning:
                return "", buf
            self._enter_reasoning(buf)
        if self.state == self._REASONING:
            return self._reasoning_text(buf.rstrip()), ""
        return "", ""  # _ANSWER_START holds only whitespace to drop; _ANSWER holds nothing

    def _enter_reasoning(self, rest: str) -> None:
        self.state = self._REASONING
        self.has_reasoning = True
        self._buf = rest

    def _reasoning_text(self, text: str) -> str:
        if not self._reasoning_started:
            text = text.lstrip()
            self._reasoning_started = bool(text)
        return text


def split_reasoning(text: str, start_in_reasoning: bool | None = None) -> tuple[str | None, str]:
    """(reasoning, answer) of a finished text; reasoning is None when there is no think block.

    ``start_in_reasoning``: True when the generation prompt opened ``<think>`` (the text starts inside the
    reasoning); None guesses it: a ``</think>`` with no ``<think>`` before it means the text started inside.
    """
    if start_in_reasoning is None:
        close = text.find(THINK_CLOSE)
        start_in_reasoning = close >= 0 and THINK_OPEN not in text[:close]
    splitter = ReasoningSplitter(start_in_reasoning)
    r1, a1 = splitter.feed(text)
    r2, a2 = splitter.finish()
    return (r1 + r2 if splitter.has_reasoning else None), a1 + a2


# ------------------------------------------------------------------------------------------------ tool calls

_TOOL_CALL_RE = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


def _tool_call(body: str) -> dict | None:
    """One OpenAI tool call from a block's JSON ``{"name": ..., "arguments": {...}}``; None if it is not one."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": args}}


def _take_calls(text: str) -> tuple[list[str], list[dict]]:
    """The pieces of ``text`` around its valid tool-call blocks, and the calls."""
    pieces, calls, pos = [], [], 0
    for match in _TOOL_CALL_RE.finditer(text):
        call = _tool_call(match.group(1).strip())
        if call is None:
            continue
        pieces.append(text[pos:match.start()])
        pos = match.end()
        calls.append(call)
    pieces.append(text[pos:])
    return pieces, calls


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(the text without its tool-call blocks, the calls as OpenAI ``tool_calls`` entries).

    Each ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` block becomes
    ``{"id", "type": "function", "function": {"name", "arguments": <JSON string>}}``. A block whose body is not
    such a JSON object, and an unclosed block, stay in the text (nothing the model wrote is dropped). When
    some call was taken out, the text left over loses its trailing whitespace (all of it, if that is all).
    """
    pieces, calls = _take_calls(text)
    return ("".join(pieces).rstrip(), calls) if calls else (text, [])


class ToolCallBuffer:
    """Streamed answer text with tool calls: text before the first ``<tool_call>`` passes through as it
    comes, bar trailing whitespace and a partial ``"<tool_c"`` at its end; from the tag on, everything is held
    until :meth:`finish` parses it. What it returns adds up to :func:`parse_tool_calls`' text."""

    def __init__(self):
        self._buf = ""
        self._capturing = False

    def feed(self, delta: str) -> str:
        self._buf += delta
        if self._capturing:
            return ""
        at = self._buf.find(TOOL_CALL_OPEN)
        if at >= 0:
            self._capturing = True
            head = self._buf[:at]
        else:
            head = self._buf[: len(self._buf) - _partial_suffix(self._buf, [TOOL_CALL_OPEN])]
        out = head.rstrip()
        self._buf = self._buf[len(out):]
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(the rest of the text to show, the tool calls)."""
        rest, self._buf = self._buf, ""
        pieces, calls = _take_calls(rest)
        return ("".join(pieces).rstrip(), calls) if calls else (rest, [])


class StopStrings:
    """Cuts streamed text at the first occurrence of any stop string (which is not shown), holding back
    an end that could be the start of one."""

    def __init__(self, stop: Sequence[str] = ()):
        self.stop = [s for s in stop if s]
        self.stopped = False
        self._buf = ""

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        if not self.stop:
            return delta
        self._buf += delta
        hits = [i for i in (self._buf.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self._buf = self._buf[: min(hits)], ""
            return out
        keep = _partial_suffix(self._buf, self.stop)
        out, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep:]
        return out

    def finish(self) -> str:
        out, self._buf = self._buf, ""
        return "" if self.stopped else out
