"""Hugging Face-style tokenizers without transformers: the ``tokenizers`` library plus the chat template.

``load_tokenizer(directory)`` reads a directory holding ``tokenizer.json`` and ``tokenizer_config.json``
(optionally ``chat_template.jinja`` and ``additional_chat_templates/*.jinja``) and returns a
:class:`Tokenizer` that behaves like ``transformers.AutoTokenizer.from_pretrained(directory)`` (a generic
``TokenizersBackend`` / ``PreTrainedTokenizerFast``, transformers 5) for everything this project needs:

* ``encode(text)`` / ``encode_batch(texts)``: the ids of ``tokenizer.encode(text)`` /
  ``tokenizer(text)["input_ids"]``. ``add_special_tokens`` defaults to True like transformers, and means what
  it means there: run the ``post_processor`` of ``tokenizer.json``. transformers ignores ``add_bos_token`` /
  ``add_eos_token`` in ``tokenizer_config.json`` when a ``tokenizer.json`` exists, so the post-processor alone
  decides; MiniMind's has none, so no bos is ever added (chat templates write ``<|im_start|>`` themselves).
  Special-token strings inside the text become their ids (unless the config sets ``split_special_tokens``).
  Truncation / padding stored in ``tokenizer.json`` are switched off, as each transformers call does.
* ``decode(ids)``: ``tokenizer.decode(ids)``, including ``clean_up_tokenization_spaces`` from the config
  (default False), which transformers 5 never applies to BPE models unless the config also sets
  ``clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output``.
* ``apply_chat_template(messages, ...)``: the directory's Jinja template rendered exactly as
  ``tokenizer.apply_chat_template(messages, tokenize=False, ...)`` does: the same sandboxed Jinja environment
  (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, a non-escaping ``tojson``, ``raise_exception``,
  ``strftime_now``, underscore-rejecting ``namespace``, a pass-through ``{% generation %}`` tag), the same
  variables (``messages``, ``tools``, ``add_generation_prompt``, every named special token such
  as ``bos_token`` / ``eos_token``, then the extra keyword arguments) and the same input clean-up (message keys
  whose value is None are dropped; ``reasoning_content`` / ``thinking`` / ``reasoning`` alias one another;
  inputs are rebuilt from plain JSON types). ``tokenize=True`` encodes the rendering without adding special
  tokens; ``sanitize_control_tokens=True`` encodes control tokens found in the inputs as plain text.
  transformers' ``documents`` (RAG) and ``continue_final_message`` are not offered (nothing here renders them;
  passing either is a TypeError, not a silently different rendering).

MiniMind-3 (``<|endoftext|>`` = pad/unk 0, ``<|im_start|>`` = bos 1, ``<|im_end|>`` = eos 2, vocab 6400) is
the target, but nothing here is specific to it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken

from minimind_jax import chat_render

__all__ = ["Tokenizer", "TokenizerError", "load_tokenizer", "render_chat_template"]

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"

# transformers' named special tokens; any other ``*_token`` string in the config is a model-specific named token
STANDARD_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Message fields that carry the reasoning; the first is the one chat templates read (transformers aliases them)
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# Private-use markers around control tokens found in user input (same code points as transformers)
_CONTROL_TOKEN_START = "\U000f0000"
_CONTROL_TOKEN_END = "\U000f0001"

# transformers' apply_chat_template parameters that only shape its tokenized output: refused rather than
# silently passed to the template as variables
_UNSUPPORTED_CHAT_KWARGS = (
    "padding", "truncation", "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
    "tokenizer_kwargs", "documents", "continue_final_message",
)


class TokenizerError(ValueError):
    """A tokenizer directory, file or chat input that cannot be used."""


# --------------------------------------------------------------------------------------------------------------
# Loading


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"invalid JSON in {path}: {e}") from e
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path} is not UTF-8 text: {e}") from e


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path} is not UTF-8 text: {e}") from e


def _token_content(value: Any, key: str, path: str) -> str | None:
    """A special-token value from the config (a string, or a serialized AddedToken dict) as its string."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{path}: special token {key!r} must be a string or an AddedToken dict, got {value!r}")


def _added_token(value: Any, key: str, path: str) -> AddedToken:
    """A config entry (string or serialized AddedToken dict) as a tokenizers AddedToken."""
    if isinstance(value, str):
        return AddedToken(value, special=True)
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        fields = {k: v for k, v in value.items() if k != "__type"}
        try:
            return AddedToken(**fields)
        except TypeError as e:
            raise TokenizerError(f"{path}: bad AddedToken {key!r}: {value!r} ({e})") from e
    raise TokenizerError(f"{path}: {key!r} must be a string or an AddedToken dict, got {value!r}")


def _load_chat_templates(directory: str, config: Mapping[str, Any], config_path: str) -> str | dict[str, str] | None:
    """The chat template(s) as transformers 5 resolves them: ``chat_template.jinja`` and
    ``additional_chat_templates/*.jinja`` take priority over ``chat_template`` in the config, which is a string or
    a list of ``{"name", "template"}``. One default template is a string; several are a dict by name."""
    templates: dict[str, str] = {}
    jinja_file = os.path.join(directory, CHAT_TEMPLATE_FILE)
    if os.path.isfile(jinja_file):
        templates["default"] = _read_text(jinja_file)
    extra_dir = os.path.join(directory, CHAT_TEMPLATE_DIR)
    if os.path.isdir(extra_dir):
        for name in sorted(os.listdir(extra_dir)):
            if name.endswith(".jinja") and os.path.isfile(os.path.join(extra_dir, name)):
                templates[name.removesuffix(".jinja")] = _read_text(os.path.join(extra_dir, name))
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    return _config_chat_templates(config, config_path)


def _config_chat_templates(config: Mapping[str, Any], config_path: str) -> str | dict[str, str] | None:
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, Sequence):
        try:
            named = {t["name"]: t["template"] for t in template}
        except (TypeError, KeyError) as e:
            raise TokenizerError(
                f"{config_path}: chat_template must be a string or a list of {{'name', 'template'}} dicts"
            ) from e
        if not all(isinstance(t, str) for t in named.values()):
            raise TokenizerError(f"{config_path}: every chat template must be a string")
        return named
    if isinstance(template, Mapping) and all(isinstance(t, str) for t in template.values()):
        return dict(template)
    raise TokenizerError(f"{config_path}: chat_template must be a string or a list of named templates")


def _named_special_tokens(config: Mapping[str, Any], path: str) -> tuple[dict[str, Any], list]:
    """Named special tokens: the standard ones, then model-specific ``*_token`` strings (``image_token`` ...) and
    the entries of a dict-valued ``extra_special_tokens``, as transformers 5 collects them; and the extra list."""
    named: dict[str, Any] = {key: config[key] for key in STANDARD_SPECIAL_TOKENS if config.get(key) is not None}
    for key, value in config.items():
        if key.endswith("_token") and key not in STANDARD_SPECIAL_TOKENS and (
            isinstance(value, str) or (isinstance(value, Mapping) and value.get("__type") == "AddedToken")
        ):
            named[key] = value
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens")
    if isinstance(extra, Mapping):
        named.update(extra)
        extra = []
    if extra is None:
        extra = []
    if not isinstance(extra, (list, tuple)):
        raise TokenizerError(f"{path}: extra_special_tokens must be a list or a dict, got {extra!r}")
    return named, list(extra)


def _tokens_to_add(backend, config: Mapping[str, Any], named: Mapping[str, Any], extra: list, named_strings: set,
                   path: str) -> list[AddedToken]:
    """What transformers adds to the vocabulary: the config's ``added_tokens_decoder`` entries again (their flags
    win over tokenizer.json's), then the named / extra special tokens the vocabulary lacks."""
    decoder_cfg = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder_cfg, Mapping):
        raise TokenizerError(f"{path}: added_tokens_decoder must be a dict")
    try:
        order = sorted(decoder_cfg.items(), key=lambda kv: int(kv[0]))
    except ValueError as e:
        raise TokenizerError(f"{path}: added_tokens_decoder keys must be token ids") from e
    to_add = [_added_token(v, f"added_tokens_decoder[{k}]", path) for k, v in order]
    known = {t.content for t in backend.get_added_tokens_decoder().values()} | {t.content for t in to_add}
    candidates = [(k, v) for k, v in named.items() if v is not None] + [("extra_special_tokens", t) for t in extra]
    for key, value in candidates:
        token = _added_token(value, key, path)
        if token.content in known:
            continue
        if not token.special and token.content in named_strings:
            token = AddedToken(token.content, single_word=token.single_word, lstrip=token.lstrip,
                               rstrip=token.rstrip, normalized=token.normalized, special=True)
        to_add.append(token)
        known.add(token.content)
    return to_add


# the MiniMind tokenizer shipped with the package (vocab 6400)
DEFAULT_TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tokenizer")


def load_tokenizer(directory: str | os.PathLike = DEFAULT_TOKENIZER_DIR) -> Tokenizer:
    """Load a Hugging Face tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``); by default the
    shipped MiniMind tokenizer.

    Raises FileNotFoundError for a missing directory or file and :class:`TokenizerError` for invalid contents,
    both naming the path.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"tokenizer directory not found: {directory}")
    tok_path = os.path.join(directory, TOKENIZER_FILE)
    cfg_path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
    for path in (tok_path, cfg_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")

    try:
        backend = tokenizers.Tokenizer.from_file(tok_path)
    except Exception as e:  # the Rust side raises plain Exception
        _read_json(tok_path)  # a clearer error if the file is not JSON at all
        raise TokenizerError(f"cannot load {tok_path} with the tokenizers library: {e}") from e
    config = _read_json(cfg_path)
    if not isinstance(config, dict):
        raise TokenizerError(f"{cfg_path} must hold a JSON object, got {type(config).__name__}")
    chat_template = _load_chat_templates(directory, config, cfg_path)
    return Tokenizer(backend, config, chat_template=chat_template, name_or_path=directory, _config_path=cfg_path)


# --------------------------------------------------------------------------------------------------------------
# The tokenizer


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the settings of ``tokenizer_config.json``; see the module docstring.

    Usually made by :func:`load_tokenizer`. ``config`` is the parsed ``tokenizer_config.json``; ``chat_template``
    overrides the config's (a string, or a dict of named templates).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        config: Mapping[str, Any] | None = None,
        *,
        chat_template: str | Mapping[str, str] | None = None,
        name_or_path: str = "",
        _config_path: str = TOKENIZER_CONFIG_FILE,
    ):
        config = dict(config or {})
        path = _config_path
        self.name_or_path = name_or_path
        self._tok = backend
        if chat_template is None:
            chat_template = _config_chat_templates(config, path)
        self._chat_templates: str | dict[str, str] | None = (
            dict(chat_template) if isinstance(chat_template, Mapping) else chat_template
        )

        named, extra = _named_special_tokens(config, path)
        self._special_map: dict[str, str] = {}
        for key, value in named.items():
            content = _token_content(value, key, path)
            if content is not None:
                self._special_map[key] = content
        self._extra_special = [_token_content(t, "extra_special_tokens", path) for t in extra]
        to_add = _tokens_to_add(backend, config, named, extra, set(self._special_map.values()), path)
        if to_add:
            backend.add_tokens(to_add)

        # Each transformers call resets truncation / padding to its arguments (none by default)
        backend.no_truncation()
        backend.no_padding()
        self.split_special_tokens = bool(config.get("split_special_tokens", False))
        backend.encode_special_tokens = self.split_special_tokens

        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self._clean_up_bpe = bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output",
                                             False))
        self.model_max_length = config.get("model_max_length")
        chat_control = config.get("chat_control_tokens")
        if chat_control is not None and not isinstance(chat_control, (list, tuple)):
            raise TokenizerError(f"{path}: chat_control_tokens must be a list of strings, got {chat_control!r}")
        self.chat_control_tokens = None if chat_control is None else list(chat_control)

    # ---------------------------------------------------------------------------------------------- vocabulary

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Size of the whole vocabulary, added tokens included (``len(hf_tokenizer)``)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """The id of ``token``, None if it is not in the vocabulary."""
        return self._tok.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        """The token string of ``index``, None if out of range."""
        return self._tok.id_to_token(int(index))

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        return self._tok.get_added_tokens_decoder()

    @property
    def special_tokens(self) -> list[str]:
        """The added tokens flagged special (those ``decode(skip_special_tokens=True)`` drops), by id."""
        return [t.content for _, t in sorted(self.added_tokens_decoder.items()) if t.special]

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens (``bos_token``, ``eos_token`` ..., then model-specific ones like
        ``image_token``), as strings: what transformers hands a chat template."""
        return dict(self._special_map)

    @property
    def extra_special_tokens(self) -> list[str]:
        return list(self._extra_special)

    def _named(self, key: str) -> str | None:
        return self._special_map.get(key)

    def _named_id(self, key: str) -> int | None:
        token = self._special_map.get(key)
        return None if token is None else self._tok.token_to_id(token)

    bos_token = property(lambda self: self._named("bos_token"))
    eos_token = property(lambda self: self._named("eos_token"))
    pad_token = property(lambda self: self._named("pad_token"))
    unk_token = property(lambda self: self._named("unk_token"))
    bos_token_id = property(lambda self: self._named_id("bos_token"))
    eos_token_id = property(lambda self: self._named_id("eos_token"))
    pad_token_id = property(lambda self: self._named_id("pad_token"))
    unk_token_id = property(lambda self: self._named_id("unk_token"))

    # ----------------------------------------------------------------------------------------- encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The ids of ``text``, as ``hf_tokenizer.encode(text, add_special_tokens=...)``.

        ``add_special_tokens`` runs tokenizer.json's post-processor (none for MiniMind: nothing is added).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """``[encode(t) for t in texts]``, in parallel on the Rust side."""
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_batch() takes a sequence of str")
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def _encode_without_added_tokens(self, text: str) -> list[int]:
        """``text`` as plain text: no added token (special or not) is matched."""
        tok = self._tok
        if tok.normalizer is not None:
            text = tok.normalizer.normalize_str(text)
        splits = [text]
        if tok.pre_tokenizer is not None:
            splits = [s for s, _ in tok.pre_tokenizer.pre_tokenize_str(text)]
        return [t.id for s in splits for t in tok.model.tokenize(s)]

    def decode(
        self, ids: Any, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None
    ) -> str:
        """The text of ``ids`` (a list, an int, or a 1-D numpy / JAX array), as ``hf_tokenizer.decode``."""
        ids = _as_id_list(ids)
        text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        # transformers 5 skips the clean-up for BPE models (it deletes real spaces) unless forced
        if clean_up_tokenization_spaces and (type(self._tok.model).__name__ != "BPE" or self._clean_up_bpe):
            text = _clean_up_tokenization(text)
        return text

    def decode_batch(self, sequences: Sequence[Any], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    # ------------------------------------------------------------------------------------------- chat template

    @property
    def chat_templates(self) -> dict[str, str]:
        """Every chat template by name (a single template is named "default")."""
        t = self._chat_templates
        if t is None:
            return {}
        return {"default": t} if isinstance(t, str) else dict(t)

    @property
    def chat_template(self) -> str | None:
        """The default chat template (None if the directory has none)."""
        t = self._chat_templates
        return t if t is None or isinstance(t, str) else t.get("default")

    def get_chat_template(self, chat_template: str | None = None, tools: Any = None) -> str:
        """The template ``apply_chat_template`` uses: ``chat_template`` (a template or a template's name), else
        the "tool_use" template when tools are given and one exists, else the default one."""
        templates = self._chat_templates
        if isinstance(templates, dict):
            if chat_template is not None and chat_template in templates:
                return templates[chat_template]
            if chat_template is None:
                if tools is not None and "tool_use" in templates:
                    return templates["tool_use"]
                if "default" in templates:
                    return templates["default"]
                raise TokenizerError(
                    "this tokenizer has several chat templates and no default: pass chat_template= one of "
                    f"{sorted(templates)}"
                )
        elif chat_template is None:
            if templates is None:
                raise TokenizerError(f"{self.name_or_path or 'this tokenizer'} has no chat template")
            return templates
        return chat_template

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        add_generation_prompt: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        open_thinking: bool | None = None,
        *,
        chat_template: str | None = None,
        tokenize: bool = False,
        sanitize_control_tokens: bool = False,
        **kwargs: Any,
    ) -> str | list[int] | list[str] | list[list[int]]:
        """Render a conversation (or a batch of them) with the chat template, as
        ``hf_tokenizer.apply_chat_template(..., tokenize=False)`` does; ``tokenize=True`` returns ids instead
        (the rendering encoded without adding special tokens, like transformers with ``return_dict=False``).

        ``open_thinking`` reaches the template only when not None (MiniMind-3's switch for an open ``<think>``
        in the generation prompt); any other keyword argument is a template variable too.
        ``sanitize_control_tokens`` (needs ``tokenize=True``): control tokens (special tokens, plus added tokens
        the template writes or listed in the config's ``chat_control_tokens``) that appear in the messages,
        tools or keyword arguments are encoded as plain text, so user input cannot forge them.
        """
        bad = sorted(k for k in kwargs if k in _UNSUPPORTED_CHAT_KWARGS)
        if bad:
            raise TypeError(f"apply_chat_template() does not support {', '.join(bad)} (transformers-only options)")
        if open_thinking is not None:
            kwargs["open_thinking"] = open_thinking
        template = self.get_chat_template(chat_template, tools)

        if isinstance(messages, (list, tuple)) and len(messages) == 0:
            raise TokenizerError("cannot apply the chat template to an empty conversation")
        batched = isinstance(messages, (list, tuple)) and (
            isinstance(messages[0], (list, tuple)) or hasattr(messages[0], "messages")
        )
        conversations = list(messages) if batched else [messages]
        conversations = [_normalize_chat_messages(c) for c in conversations]

        if sanitize_control_tokens:
            if not tokenize:
                raise TokenizerError("sanitize_control_tokens=True requires tokenize=True")
            control_re, _ = _control_token_patterns(self._control_tokens(template))
            conversations = [_mark_control_tokens(c, control_re) for c in conversations]
            tools = _mark_control_tokens(tools, control_re)
            kwargs = _mark_control_tokens(kwargs, control_re)

        template_kwargs = {**self._special_map, **kwargs}  # keyword arguments win over special tokens
        rendered = [
            render_chat_template(template, c, tools=tools, add_generation_prompt=add_generation_prompt, **template_kwargs)
            for c in conversations
        ]
        if tokenize:
            if sanitize_control_tokens:
                out = [self._encode_marked_chat(r) for r in rendered]
            else:
                out = self.encode_batch(rendered, add_special_tokens=False)
        else:
            out = rendered
        return out if batched else out[0]

    # control-token sanitizing (transformers' ``sanitize_control_tokens``)

    def _control_tokens(self, template: str) -> tuple[str, ...]:
        added = self.added_tokens_decoder.values()
        if self.chat_control_tokens is not None:
            chosen = set(self.chat_control_tokens)
            return tuple(t.content for t in added if t.special or t.content in chosen)
        # Default: special tokens, plus added tokens the template's literal text contains (except whitespace)
        literal = _template_literal_text(template)
        return tuple(t.content for t in added if t.special or (t.content in literal and not t.content.isspace()))

    def _encode_marked_chat(self, chat: str) -> list[int]:
        """Encode a rendering whose user-supplied control tokens are wrapped in markers: those as text, the rest
        (the template's own control tokens included) normally. Lone markers are dropped but still split text."""
        added = tuple(t.content for _, t in sorted(self.added_tokens_decoder.items()))
        _, markers_re = _control_token_patterns(added)
        pieces = markers_re.split(chat)
        newline_ids = self.encode("\n", add_special_tokens=False)
        ids = self.encode(pieces[0], add_special_tokens=False)
        for i, piece in enumerate(pieces[1:], start=1):
            if not piece:
                continue
            as_text = i % 2 == 1  # odd pieces are the marked tokens
            encode = self._encode_without_added_tokens if as_text else functools.partial(
                self.encode, add_special_tokens=False)
            # Encode after a newline (so no tokenizer adds a word-start prefix), then drop the newline again
            piece_ids = encode("\n" + piece)
            if piece_ids[: len(newline_ids)] == newline_ids:
                piece_ids = piece_ids[len(newline_ids):]
            else:
                piece_ids = encode(piece)
            if as_text and self._tok.token_to_id(piece) in piece_ids:
                raise TokenizerError(f"cannot sanitize {piece!r}: the tokenizer produces it from plain text")
            ids += piece_ids
        return ids


def _as_id_list(ids: Any) -> list[int]:
    if isinstance(ids, Mapping):
        ids = ids["input_ids"]
    if hasattr(ids, "tolist"):  # numpy / JAX arrays and scalars
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


def _clean_up_tokenization(text: str) -> str:
    return (
        text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",").replace(" ' ", "'")
        .replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s").replace(" 've", "'ve")
        .replace(" 're", "'re")
    )


# --------------------------------------------------------------------------------------------------------------
# Chat template rendering (mirrors transformers.utils.chat_template_utils)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (marks assistant text for transformers' assistant mask):
    accepted and rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _TemplateDict:
    """``dict(...)`` inside templates, without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore-prefixed attributes (as transformers' does)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}"
            )


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; transformers' is plain json.dumps with these options
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=32)
def _compile(template: str):
    """The template in transformers' sandboxed environment (trim / lstrip blocks, loop controls, its globals)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(template)


@functools.lru_cache(maxsize=32)
def _template_literal_text(template: str) -> str:
    """The template's literal text and string constants, NUL-joined (so a search can't match across two)."""
    ast = _compile(template).environment.parse(template)
    literals = {node.data for node in ast.find_all(jinja2.nodes.TemplateData)}
    literals |= {node.value for node in ast.find_all(jinja2.nodes.Const) if isinstance(node.value, str)}
    return "\0".join(literals)


@functools.lru_cache(maxsize=32)
def _control_token_patterns(tokens: tuple[str, ...]) -> tuple[re.Pattern, re.Pattern]:
    longest_first = sorted(tokens, key=len, reverse=True)
    control_re = re.compile("|".join(map(re.escape, longest_first)) or "(?!)")
    s, e = _CONTROL_TOKEN_START, _CONTROL_TOKEN_END
    markers_re = re.compile(f"{s}({control_re.pattern}){e}|[{s}{e}]")
    return control_re, markers_re


def _mark_control_tokens(obj: Any, control_re: re.Pattern) -> Any:
    if isinstance(obj, str):
        obj = obj.replace(_CONTROL_TOKEN_START, "").replace(_CONTROL_TOKEN_END, "")  # no forged markers
        return control_re.sub(f"{_CONTROL_TOKEN_START}\\g<0>{_CONTROL_TOKEN_END}", obj)
    if isinstance(obj, dict):
        return {k: _mark_control_tokens(v, control_re) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_mark_control_tokens(v, control_re) for v in obj]
    return obj


def _objects_to_dicts(value: Any) -> Any:
    """Dataclasses and pydantic models (e.g. OpenAI SDK messages) inside messages as dicts."""
    if value is None or type(value) in (str, int, float, bool):  # the common case first: parsed JSON
        return value
    if isinstance(value, Mapping):
        return {k: _objects_to_dicts(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_objects_to_dicts(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_objects_to_dicts(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _objects_to_dicts(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _objects_to_dicts(value.model_dump())
    return value


def _normalize_chat_messages(conversation: Any) -> list[dict]:
    """Messages as dicts, minus the keys whose value is None (APIs send ``content=None``, ``tool_calls=None``)."""
    messages = _objects_to_dicts(getattr(conversation, "messages", conversation))
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise TypeError(f"chat messages must be dicts, dataclasses or pydantic models, got {message!r}")
        out.append({k: v for k, v in message.items() if v is not None})
    return out


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types (what the sandboxed template may touch); anything else
    becomes an inert ``"<TypeName>"`` placeholder, as in transformers."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning_fields(chat: list) -> list:
    """Fill ``reasoning_content`` from the older names for it, and ``thinking`` (which gpt-oss templates read)."""
    out = []
    for message in chat:
        if isinstance(message, dict):
            reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    **kwargs: Any,
) -> str:
    """Render one conversation with a Jinja chat template as transformers' ``render_jinja_template`` does.

    ``messages`` should already be normalized (``Tokenizer.apply_chat_template`` does it); ``kwargs`` are
    template variables (special tokens, ``open_thinking`` ...). MiniMind's own templates render in plain
    Python where the input is clear-cut (:mod:`minimind_jax.chat_render`: the same text, faster).
    """
    if tools is not None:
        for tool in tools:
            if not isinstance(tool, Mapping):
                raise TypeError(
                    f"tools must be JSON schemas (dicts); got {type(tool).__name__} (converting Python functions "
                    "to schemas needs transformers.utils.get_json_schema)"
                )
        tools = list(tools)
    fast = chat_render.render(template, _alias_reasoning_fields(list(getattr(messages, "messages", messages))),
                              tools, add_generation_prompt, kwargs)
    if fast is not None:  # MiniMind's own templates, in plain Python (same text)
        return fast
    return _render_jinja(template, messages, tools, add_generation_prompt, kwargs)


def _render_jinja(template: str, messages: Any, tools: list | None, add_generation_prompt: bool,
                  kwargs: Mapping[str, Any]) -> str:
    compiled = _compile(template)
    chat = _plain(list(getattr(messages, "messages", messages)))
    for message in chat:
        if not isinstance(message, dict):
            raise TypeError(f"chat messages must be dicts, dataclasses or pydantic models, got {message!r}")
    # ``documents`` is None as in transformers without documents, so templates that read it render the same
    return compiled.render(messages=_alias_reasoning_fields(chat), tools=_plain(tools), documents=None,
                           add_generation_prompt=add_generation_prompt, **_plain(kwargs))
