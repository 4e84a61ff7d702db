"""A Hugging Face sequence-classification / reward model as the ``reward_model`` reward (the torch extra).

``--reward_model DIR`` names either a reward model written by ``--stage reward`` (our checkpoint: a
``manifest.json``; :mod:`minimind_jax.rl.reward_model`) or a Hugging Face model directory (a ``config.json``
whose architecture is a ``...ForSequenceClassification`` with one label, its weights and its tokenizer), e.g. a
Qwen2 / Llama reward model saved with ``save_pretrained``. :func:`open_reward_model` tells them apart.

A Hugging Face model runs in PyTorch on the CPU, float32, in evaluation mode, from local files only (nothing is
downloaded, no remote code is run). Each (record, response) is rendered with the model's own tokenizer:

* with a chat template: the record's ``messages`` plus the response as the assistant's reply, through
  ``apply_chat_template`` (the template adds its own special tokens);
* without one: the text pair (the messages' contents joined by newlines, the response), as encoder reward models
  (e.g. DeBERTa ones) are trained.

The score is the model's single logit (computed at the last non-padding token, as the Hugging Face classes
pool). A batch is scored ``batch_size`` rows at a time, right-padded, cut from the left (the response's end is
kept) to ``max_length`` tokens.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from minimind_jax.checkpoint import looks_like_checkpoint
from minimind_jax.weights import WeightsError


def is_hf_model_dir(path: str | Path) -> bool:
    """A Hugging Face model directory (a ``config.json``) that is not one of our checkpoints."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and not looks_like_checkpoint(path)


def _check_architecture(path: Path) -> None:
    """A clear error for a Hugging Face directory that holds another kind of model (a causal LM would load with a
    randomly initialised score head)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"reward_model {path}: cannot read config.json: {e}") from None
    archs = config.get("architectures") or []
    if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise WeightsError(f"reward_model {path}: a {', '.join(archs)}, not a sequence-classification / reward "
                           "model (its config.json architectures should end in ForSequenceClassification)")


class HFRewardModel:
    """The ``reward_model`` reward from a Hugging Face directory: ``fn(response, record) -> float`` and
    ``fn.batch(responses, records) -> list[float]`` (what :func:`~minimind_jax.rl.rewards.score` calls)."""

    def __init__(self, path: str | Path, max_length: int = 2048, batch_size: int = 16):
        # torch / transformers are the optional torch extra: imported only when a Hugging Face model is asked for
        try:
            import torch
            import transformers
        except ImportError:
            raise WeightsError(f"reward_model {path}: a Hugging Face reward model needs the torch extra: "
                               "pip install -e '.[torch]'") from None
        self.path, self._torch = Path(path), torch
        _check_architecture(self.path)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            self.model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
                self.path, local_files_only=True, dtype=torch.float32, output_loading_info=True)
        except Exception as e:  # transformers raises OSError / ValueError / KeyError ... for a bad directory
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise WeightsError(f"reward_model {path}: cannot load a Hugging Face sequence-classification model "
                               f"and its tokenizer: {type(e).__name__}: {first}") from None
        if info.get("missing_keys"):
            raise WeightsError(f"reward_model {path}: weights missing from the directory (they would be random): "
                               f"{', '.join(sorted(info['missing_keys'])[:4])}")
        if self.model.config.num_labels != 1:
            raise WeightsError(f"reward_model {path}: the model has {self.model.config.num_labels} labels; a reward "
                               "model gives one score (num_labels 1)")
        self.model.eval()
        self._prepare_padding()
        self.max_length, self.batch_size = max_length, batch_size

    def _prepare_padding(self) -> None:
        """Right padding with a pad token the model knows (its classes find the last token by it)."""
        tok = self.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = tok.pad_token_id
        tok.padding_side, tok.truncation_side = "right", "left"

    def __call__(self, response: str, record: Mapping | None) -> float:
        return self.batch([response], [record])[0]

    def batch(self, responses: Sequence[str], records: Sequence[Mapping | None]) -> list[float]:
        """The scores of many responses, ``batch_size`` forward rows at a time."""
        out: list[float] = []
        pairs = list(zip(responses, records, strict=True))
        for i in range(0, len(pairs), self.batch_size):
            out.extend(self._forward(pairs[i:i + self.batch_size]))
        return out

    def render(self, response: str, record: Mapping | None) -> str | tuple[str, str]:
        """The text the model scores: the chat-templated conversation, or a (prompt, response) pair."""
        messages = list((record or {}).get("messages") or [])
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": response}],
                                                      tokenize=False)
        return "\n".join(str(m.get("content", "")) for m in messages), response

    def _forward(self, pairs) -> list[float]:
        texts = [self.render(response, record) for response, record in pairs]
        templated = isinstance(texts[0], str)
        kwargs = {"padding": True, "truncation": True, "max_length": self.max_length, "return_tensors": "pt"}
        if templated:
            enc = self.tokenizer(texts, add_special_tokens=False, **kwargs)
        else:
            enc = self.tokenizer([t[0] for t in texts], [t[1] for t in texts], **kwargs)
        with self._torch.inference_mode():
            logits = self.model(**enc).logits
        return [float(v) for v in logits[:, 0].float().tolist()]
