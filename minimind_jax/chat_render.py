"""MiniMind's two chat templates rendered in plain Python, byte-identical to the Jinja rendering.

Preparing SFT / DPO / RL data renders one chat template per record. Jinja's sandboxed environment (the one
transformers uses, and :mod:`minimind_jax.tokenizer` reproduces) spends most of that time on its own
machinery (sandboxed attribute lookups, macro calls, loop contexts): profiled on the sample SFT records it is
~0.35 ms a record, about as long as encoding the rendered text. No library renders Jinja faster with the same
semantics, so the two templates this project's tokenizers carry, MiniMind-3's and the bundled one, are written
out here by hand.

:func:`render` is used only when the template string equals one of them exactly, and only for inputs whose
meaning is clear: messages that are plain dicts with a string ``role``; ``content`` / ``reasoning_content``
strings where present; ``tool_calls`` a list of dicts whose function has a string ``name`` and string or JSON
``arguments``; tools JSON dicts. For anything else it returns None and the caller renders with Jinja, which
gives the template's own answer (or its error). ``tests/test_chat_render.py`` checks every sample record and
hundreds of randomised conversations against the Jinja rendering.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["render", "known_template"]

_TOOLS_INTRO = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_TOOLS_OUTRO = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
                "<args-json-object>}\n</tool_call>")
_CLOSED_THINK = "<think>\n\n</think>\n\n"


def _tojson(x: Any) -> str:
    return json.dumps(x, ensure_ascii=False)  # transformers' tojson filter with its default options


def _is_json(x: Any) -> bool:
    """Plain JSON values only (exact types), so ``json.dumps`` writes what the template's ``tojson`` would."""
    t = type(x)
    if x is None or t in (str, int, float, bool):
        return True
    if t is list:
        return all(_is_json(v) for v in x)
    if t is dict:
        return all(type(k) is str and _is_json(v) for k, v in x.items())
    return False


def _plain_call(call: Any) -> dict | None:
    """The tool call's function (``call.function`` when truthy, else the call), or None if not clear-cut."""
    if type(call) is not dict:
        return None
    function = call.get("function")
    if function:
        call = function
    if type(call) is not dict or type(call.get("name")) is not str:
        return None
    arguments = call.get("arguments")
    if type(arguments) is not str and (arguments is None or not _is_json(arguments)):
        return None
    return call


def _clear_cut(messages: Any, tools: Any) -> bool:
    if type(messages) is not list or not messages:
        return False
    for m in messages:
        if type(m) is not dict or type(m.get("role")) is not str:
            return False
        for key in ("content", "reasoning_content"):
            if key in m and type(m[key]) is not str:
                return False
        if "tool_calls" in m:
            calls = m["tool_calls"]
            if type(calls) is not list or any(_plain_call(c) is None for c in calls):
                return False
    return tools is None or (type(tools) is list and all(type(t) is dict and _is_json(t) for t in tools))


def _split_think(content: str) -> tuple[str, str]:
    """(reasoning, answer) of an assistant text that writes its own ``</think>``, as both templates do."""
    parts = content.split("</think>")
    return parts[0].rstrip("\n").split("<think>")[-1].lstrip("\n"), parts[-1]


def _call_text(call: dict) -> str:
    f = _plain_call(call)
    arguments = f["arguments"] if type(f["arguments"]) is str else _tojson(f["arguments"])
    return '<tool_call>\n{"name": "' + f["name"] + '", "arguments": ' + arguments + "}\n</tool_call>"


def _assistant(m: dict) -> str:
    """An assistant turn: the reasoning (its own field, else split off the content), the answer, tool calls."""
    content = m.get("content", "")
    reasoning = ""
    if "reasoning_content" in m:
        reasoning = m["reasoning_content"]
    elif "</think>" in content:
        reasoning, content = _split_think(content)
        content = content.lstrip("\n")
    out = ["<|im_start|>assistant\n<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")]
    for i, call in enumerate(m.get("tool_calls") or ()):
        if i > 0 or content:
            out.append("\n")
        out.append(_call_text(call))
    out.append("<|im_end|>\n")
    return "".join(out)


def _tool(messages: list, i: int) -> str:
    out = "" if i > 0 and messages[i - 1]["role"] == "tool" else "<|im_start|>user"
    out += "\n<tool_response>\n" + messages[i].get("content", "") + "\n</tool_response>"
    if i == len(messages) - 1 or messages[i + 1]["role"] != "tool":
        out += "<|im_end|>\n"
    return out


def _turns(messages: list) -> str:
    out = []
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "user" or (role == "system" and i > 0):
            out.append("<|im_start|>" + role + "\n" + m.get("content", "") + "<|im_end|>\n")
        elif role == "assistant":
            out.append(_assistant(m))
        elif role == "tool":
            out.append(_tool(messages, i))
    return "".join(out)


def _tools_block(tools: list) -> str:
    return _TOOLS_INTRO + "".join("\n" + _tojson(t) for t in tools) + _TOOLS_OUTRO


def _conversation(messages: list, tools: list | None, add_generation_prompt: Any, open_thinking: Any, *,
                  system_needs_content: bool) -> str | None:
    """Both templates: the system block (with the tools), the turns, the generation prompt. MiniMind-3 adds text
    to a leading system message's content, so without one Jinja errors (None: let it); the bundled one reads ''."""
    first = messages[0]
    opens_with_system = first["role"] == "system"
    if opens_with_system and system_needs_content and "content" not in first:
        return None
    system = first.get("content", "") if opens_with_system else None
    head = ""
    if tools:
        intro = "" if system is None else system + "\n\n"
        head = "<|im_start|>system\n" + intro + _tools_block(tools) + "<|im_end|>\n"
    elif system is not None:
        head = "<|im_start|>system\n" + system + "<|im_end|>\n"
    tail = ""
    if add_generation_prompt:
        tail = "<|im_start|>assistant\n" + ("<think>\n" if open_thinking is True else _CLOSED_THINK)
    return head + _turns(messages) + tail


_bundled = functools.partial(_conversation, system_needs_content=False)
_minimind3 = functools.partial(_conversation, system_needs_content=True)


# sha256 of the exact template strings: the bundled tokenizer's (minimind_jax/assets/tokenizer) and MiniMind-3's
_RENDERERS: dict[str, Callable[..., str | None]] = {
    "1b9de1e16f2cb6c8c297792aa529a04616fbf3a3d42462846371c578fe6bfe6d": _bundled,
    "97c6a9ef3f8d35044f435bb7773f1af160a7328ab6e8d2e9d67702941320a711": _minimind3,
}


@functools.lru_cache(maxsize=32)
def known_template(template: str) -> Callable[..., str | None] | None:
    """The plain-Python renderer of this exact template string, or None."""
    return _RENDERERS.get(hashlib.sha256(template.encode("utf-8")).hexdigest())


def render(template: str, messages: Sequence[Mapping[str, Any]], tools: Any, add_generation_prompt: Any,
           variables: Mapping[str, Any]) -> str | None:
    """The template's rendering of the conversation, or None where the caller must render with Jinja (an
    unknown template, or an input that is not clear-cut; see the module docstring). ``variables`` are the
    other template variables (only ``open_thinking`` is read)."""
    renderer = known_template(template)
    open_thinking = variables.get("open_thinking")
    if renderer is None or type(open_thinking) not in (bool, type(None)) or not _clear_cut(messages, tools):
        return None
    return renderer(messages, tools, add_generation_prompt, open_thinking)
