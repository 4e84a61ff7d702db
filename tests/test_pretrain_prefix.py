"""encode_pretrain encodes only a prefix of a long text; the ids must be exactly the whole text's."""

import pathlib

import pytest

from minimind_jax.data import encode_pretrain
from minimind_jax.data.samples import PREFIX_CHARS_PER_TOKEN, leading_tokens
from minimind_jax.tokenizer import load_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "minimind_jax" / "assets" / "tokenizer"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER_DIR)


class Recording:
    """Delegates to the tokenizer; remembers the length of every text encoded."""

    def __init__(self, tok):
        self.tok, self.lengths = tok, []

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def encode(self, text, **kwargs):
        self.lengths.append(len(text))
        return self.tok.encode(text, **kwargs)


def _texts():
    sample = (ROOT / "data" / "sample" / "pretrain.jsonl").read_text(encoding="utf-8")
    return {
        "words": "one two three four five six seven eight nine ten " * 400,
        "one_char": "a" * 20000,
        "spaces": " " * 5000 + "x",
        "digits": "1234567890" * 2000,
        "cjk": "你好世界，今天天气很好。机器学习是人工智能的一个分支" * 300,
        "cjk_run": "中" * 9000,
        "newlines": "line\n\n" * 3000,
        "mixed": ("Hello, 世界! <think>ok</think> " + "🙂" * 7 + "\t") * 300,
        "sample": sample * 3,
    }


@pytest.mark.parametrize("name", sorted(_texts()))
@pytest.mark.parametrize("max_seq_len", [2, 3, 7, 64, 257])
def test_pretrain_prefix_equals_whole_text(tok, name, max_seq_len):
    text = _texts()[name]
    whole = tok.encode(text, add_special_tokens=False)
    rec = Recording(tok)
    out = encode_pretrain({"text": text}, rec, max_seq_len)
    keep = whole[: max_seq_len - 2]
    assert out.arrays["input_ids"][: len(keep) + 2].tolist() == [tok.bos_token_id, *keep, tok.eos_token_id]
    assert out.truncated == (len(whole) > max_seq_len - 2)
    assert max(rec.lengths) < len(text), "a long text must not be encoded whole"


@pytest.mark.parametrize("count", [1, 2, 5, 16, 50])
def test_merge_across_the_first_cut(tok, count):
    """Put a long word across the first prefix's cut: the ids at the cut differ, the kept ones must not."""
    cut = count * PREFIX_CHARS_PER_TOKEN
    for shift in range(1, 12):
        head = "x " * ((cut - shift) // 2)
        text = head + "internationalization " * 40
        ids = leading_tokens(text, tok, count)
        whole = tok.encode(text, add_special_tokens=False)
        assert ids[:count] == whole[:count]
        assert len(ids) >= min(count, len(whole))


def test_short_text_is_encoded_whole(tok):
    for text in ["", "hi", "Hello world, 你好。"]:
        whole = tok.encode(text, add_special_tokens=False)
        assert leading_tokens(text, tok, 100) == whole
        out = encode_pretrain({"text": text}, tok, 64)
        assert not out.truncated
        assert out.arrays["input_ids"][: len(whole) + 2].tolist() == [tok.bos_token_id, *whole, tok.eos_token_id]
