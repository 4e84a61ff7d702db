"""The assistant-output helpers: <think> splitting (whole and streamed), <tool_call> parsing, stop strings.
The streamed versions are checked against the whole-text ones, and those against a plain reference, for
random texts cut into random deltas."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minimind_jax.chat_format import (ReasoningSplitter, StopStrings, ToolCallBuffer, parse_tool_calls,
                                      prompt_opens_reasoning, split_reasoning)
from minimind_jax.tokenizer import load_tokenizer


@pytest.mark.parametrize("text,start,expected", [
    ("<think>\nhmm\n</think>\n\nHi", False, ("hmm", "Hi")),
    ("<think>\nhmm\n</think>\n\nHi", None, ("hmm", "Hi")),
    ("  <think>a\n b</think>x\n", False, ("a\n b", "x\n")),
    ("hmm\n</think>\n\nHi", True, ("hmm", "Hi")),  # the prompt opened <think>
    ("hmm\n</think>\n\nHi", None, ("hmm", "Hi")),  # ... guessed from the lone </think>
    ("hmm\n</think>\n\nHi", False, (None, "hmm\n</think>\n\nHi")),
    ("Hi there", None, (None, "Hi there")),
    ("Hi there", True, ("Hi there", "")),  # stopped inside the reasoning
    ("<think>\nunfinished ", False, ("unfinished", "")),
    ("<think>\n\n</think>\n\n", False, ("", "")),
    ("<thin", False, (None, "<thin")),
    ("", True, ("", "")),
    ("", False, (None, "")),
    ("a <think>b</think> c", None, (None, "a <think>b</think> c")),  # a block only counts at the start
    ("<think>x</think>y</think>z", False, ("x", "y</think>z")),
    ("\n</think>\n\nHi", False, ("", "Hi")),  # the model repeated the prompt's closing tag
    ("</thi", False, (None, "</thi")),
])
def test_split_reasoning(text, start, expected):
    assert split_reasoning(text, start) == expected


def _reference_split(text, start_in_reasoning):
    """The split in a few plain lines."""
    rest = text.lstrip()
    if rest.startswith("<think>"):
        body = rest[len("<think>"):]
    elif start_in_reasoning or rest.startswith("</think>"):
        body = text
    else:
        return None, text
    end = body.find("</think>")
    if end < 0:
        return body.strip(), ""
    return body[:end].strip(), body[end + len("</think>"):].lstrip()


_PIECES = ["<think>", "</think>", "<thi", "nk>", "</th", "ink>", "<", ">", "\n", " ", "a", "bc", "<tool_call>",
           "</tool_call>", '{"name": "f", "arguments": {"x": 1}}', "STOP", "ST", "OP"]
_texts = st.lists(st.sampled_from(_PIECES), max_size=14).map("".join)


def _chunks(text, cuts):
    points = sorted({min(c, len(text)) for c in cuts})
    return [text[a:b] for a, b in zip([0] + points, points + [len(text)])]


@settings(max_examples=300, deadline=None)
@given(text=_texts, cuts=st.lists(st.integers(0, 200), max_size=8), start=st.booleans())
def test_streamed_split_adds_up_to_the_whole_split(text, cuts, start):
    splitter = ReasoningSplitter(start)
    reasoning = answer = ""
    for delta in _chunks(text, cuts):
        r, a = splitter.feed(delta)
        reasoning, answer = reasoning + r, answer + a
    r, a = splitter.finish()
    reasoning, answer = reasoning + r, answer + a
    expected = _reference_split(text, start)
    assert split_reasoning(text, start) == expected
    assert (reasoning if splitter.has_reasoning else None, answer) == expected


def test_streamed_split_holds_back_partial_tags():
    s = ReasoningSplitter()
    assert s.feed("<thi") == ("", "")  # could still be <think>
    assert s.feed("nk>\nStep one.\n</thi") == ("Step one.", "")  # "\n</thi" held back
    assert s.feed("nk>\n\n") == ("", "")
    assert s.feed("Answer") == ("", "Answer")
    assert s.finish() == ("", "")
    s = ReasoningSplitter(start_in_reasoning=True)
    assert s.feed("Thinking") == ("Thinking", "")
    assert s.feed(" more</") == (" more", "")
    assert s.finish() == ("</", "")  # the stream ended: the partial tag was text after all
    s = ReasoningSplitter()
    assert s.feed("Hello") == ("", "Hello")  # no think block: text passes straight through
    assert s.feed(" <think>") == ("", " <think>")


def test_prompt_opens_reasoning():
    tok = load_tokenizer()
    messages = [{"role": "user", "content": "hi"}]
    open_prompt = tok.apply_chat_template(messages, add_generation_prompt=True, open_thinking=True)
    closed_prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt_opens_reasoning(open_prompt) and not prompt_opens_reasoning(closed_prompt)
    assert not prompt_opens_reasoning("no tags")


def test_parse_tool_calls():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>\n'
            '<tool_call>{"name": "now", "arguments": "{}"}</tool_call>\n')
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "now"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "北京"}
    assert "北京" in calls[0]["function"]["arguments"]  # not \\u-escaped
    assert calls[1]["function"]["arguments"] == "{}"  # a string argument stays as written
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert calls[0]["id"] != calls[1]["id"]
    # no arguments key: empty object
    assert parse_tool_calls('<tool_call>{"name": "ping"}</tool_call>')[1][0]["function"]["arguments"] == "{}"


@pytest.mark.parametrize("text", [
    "no calls here",
    "<tool_call>not json</tool_call>",
    '<tool_call>{"arguments": {}}</tool_call>',  # no name
    '<tool_call>["a"]</tool_call>',
    '<tool_call>{"name": "f", "arguments": {}}',  # unclosed (cut by max_tokens)
])
def test_text_without_valid_tool_calls_is_kept(text):
    assert parse_tool_calls(text) == (text, [])


def test_invalid_block_stays_beside_valid_one():
    text = '<tool_call>oops</tool_call> then <tool_call>{"name": "f", "arguments": {}}</tool_call>  '
    content, calls = parse_tool_calls(text)
    assert content == "<tool_call>oops</tool_call> then" and len(calls) == 1


@settings(max_examples=300, deadline=None)
@given(text=_texts, cuts=st.lists(st.integers(0, 200), max_size=8))
def test_streamed_tool_calls_add_up_to_the_whole_parse(text, cuts):
    buf = ToolCallBuffer()
    shown = "".join(buf.feed(d) for d in _chunks(text, cuts))
    rest, calls = buf.finish()
    content, expected = parse_tool_calls(text)
    assert shown + rest == content
    assert [c["function"] for c in calls] == [c["function"] for c in expected]
    assert text.startswith(shown)  # shown text is never taken back


def test_tool_call_buffer_streams_text_before_the_call():
    buf = ToolCallBuffer()
    assert buf.feed("Sure, ") == "Sure,"
    assert buf.feed("checking.\n<tool_") == " checking."
    assert buf.feed('call>{"name": "f", "arguments": {"a": 1}}</tool_call>') == ""
    rest, calls = buf.finish()
    assert rest == "" and calls[0]["function"] == {"name": "f", "arguments": '{"a": 1}'}


@settings(max_examples=200, deadline=None)
@given(text=_texts, cuts=st.lists(st.integers(0, 200), max_size=8),
       stop=st.lists(st.sampled_from(["STOP", "</think>", "a", "x"]), max_size=3))
def test_stop_strings_streamed_equal_cut_at_first_match(text, cuts, stop):
    s = StopStrings(stop)
    out = "".join(s.feed(d) for d in _chunks(text, cuts)) + s.finish()
    hits = [text.find(x) for x in stop if x in text]
    assert out == (text[: min(hits)] if hits else text)
    assert s.stopped == bool(hits)


def test_stop_strings_hold_back_a_possible_start():
    s = StopStrings(["STOP"])
    assert s.feed("abcST") == "abc"
    assert s.feed("O") == ""
    assert s.feed("x") == "STOx"
    assert s.feed("ST") == ""
    assert s.feed("OP and more") == "" and s.stopped
    assert s.feed("later") == "" and s.finish() == ""
