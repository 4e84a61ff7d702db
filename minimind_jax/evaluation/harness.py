"""``minimind-jax``: lm-evaluation-harness's model for this project's checkpoints (or anything the converter
reads), scored on :class:`~minimind_jax.evaluation.scoring.Scorer` and generating with
:class:`~minimind_jax.generate.Generator`.

    lm_eval's Python API:  import minimind_jax.evaluation.harness; lm_eval.simple_evaluate(model="minimind-jax", ...)
    command line:          python -m minimind_jax.evaluation --model minimind-jax \
                               --model_args pretrained=out/quickstart/pretrain_128/weights,policy=bf16,batch_size=8 ...

Tokenisation follows lm-eval's ``hf`` model on MiniMind's HF export: no BOS is added to the text
(``add_bos_token`` is false in MiniMind's tokenizer config), an empty context is the BOS token
``<|im_start|>`` (``prefix_token_id``), generation stops at ``<|im_end|>`` (``eot_token_id``), and the
context/continuation split, left truncation and rolling windows are lm-eval's own functions.
"""

from __future__ import annotations

import json

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from minimind_jax import weights
from minimind_jax.evaluation.scoring import Scorer
from minimind_jax.generate import Generator, SamplingParams, default_eos_ids, tokenizer_for

__all__ = ["MiniMindJaxLM"]

_STOP_CHECK_EVERY = 8  # decode steps between checks of the stop strings


def _bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")


@register_model("minimind-jax")
class MiniMindJaxLM(TemplateLM):
    """Arguments (``--model_args k=v,...``): ``pretrained`` (checkpoint directory or file), ``policy`` (fp32,
    bf16, bf16-params), ``batch_size``, ``tokenizer`` (directory; default the checkpoint's, else the bundled
    one), ``max_length`` (default max_position_embeddings), ``max_gen_toks`` (256), ``add_bos_token``."""

    def __init__(self, pretrained: str, policy: str = "fp32", batch_size: int | str = 8, tokenizer: str | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool | str = False,
                 **unused):
        super().__init__()
        config, params = weights.load(str(pretrained))
        self.tokenizer = tokenizer_for(str(pretrained), tokenizer)
        size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.scorer = Scorer(params, config, policy, batch_size=size)
        self.generator = Generator(params, config, policy, eos_ids=default_eos_ids(config, self.tokenizer))
        self._max_length = int(max_length or config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = _bool(add_bos_token)
        self.pretrained = str(pretrained)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """lm-eval's CLI passes its own ``--batch_size`` (default 1) next to ``--model_args``; a value given in
        ``--model_args`` wins."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    # ------------------------------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self.scorer.batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.tokenizer.encode(string, add_special_tokens=False)
        add_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        bos = self.tokenizer.bos_token_id
        if add_bos and bos is not None and not string.startswith(self.tokenizer.decode([bos])):
            ids = [bos] + ids
        return ids

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The tokenizer's chat template; without a generation prompt the last (assistant) message is left open,
        as transformers' ``continue_final_message`` does."""
        text = self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)
        if not add_generation_prompt and chat_history:
            final = str(chat_history[-1].get("content", "")).strip()
            if final and final in text:
                text = text[:text.rindex(final) + len(final)]
        return text

    # ------------------------------------------------------------------------------------------ scoring
    def _window(self, context: list[int], continuation: list[int]) -> list[int]:
        return (context + continuation)[-(self.max_length + 1):]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        seqs = [self._window(ctx, cont) for _, ctx, cont in requests]
        with tqdm(total=len(seqs), desc="loglikelihood", disable=disable_tqdm) as bar:
            answers = self.scorer.loglikelihoods(seqs, [len(cont) for _, _, cont in requests])
            bar.update(len(seqs))
        for (key, _, _), answer in zip(requests, answers):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of log p over every token of each text, in lm-eval's disjoint windows of ``max_length``."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string)
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``) continuations cut at the first stop string, batched per set of
        generation arguments."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out = [""] * len(requests)
        eos = self.tokenizer.decode([self.eot_token_id])
        with tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm) as bar:
            for members in groups.values():
                kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), self.max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                max_new = int(kwargs.pop("max_gen_toks"))
                sampling = _sampling(kwargs)
                for start in range(0, len(members), self.batch_size):
                    chunk = members[start:start + self.batch_size]
                    texts = self._generate([requests[i].args[0] for i in chunk], max_new, sampling, until)
                    for i, text in zip(chunk, texts):
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(chunk))
        return out

    def _generate(self, contexts: list[str], max_new: int, sampling: SamplingParams, until: list[str]) -> list[str]:
        if max_new >= self.max_length:
            raise ValueError(f"max_gen_toks ({max_new}) must be below the model's context ({self.max_length})")
        prompts = [self.tok_encode(c)[-(self.max_length - max_new):] or [self.prefix_token_id] for c in contexts]
        n = len(prompts)
        prompts += [prompts[0]] * (self.batch_size - n)  # a full batch: one compile per length bucket
        tokens = [[] for _ in prompts]
        for new in self.generator.stream(prompts, max_new, sampling, chunk=_STOP_CHECK_EVERY):
            for acc, t in zip(tokens, new):
                acc.extend(t)
            texts = [self.tokenizer.decode(t, skip_special_tokens=False) for t in tokens[:n]]
            if all(any(s and s in text for s in until) for text in texts):
                break
        eos = set(self.generator.eos_ids)
        cut = [t[:next((j for j, x in enumerate(t) if x in eos), len(t))] for t in tokens[:n]]
        return [postprocess_generated_text(self.tokenizer.decode(t, skip_special_tokens=True), until, None)
                for t in cut]


def _sampling(kwargs: dict) -> SamplingParams:
    if not kwargs.get("do_sample"):
        return SamplingParams.make_greedy()
    return SamplingParams(temperature=float(kwargs.get("temperature", 1.0)), top_p=float(kwargs.get("top_p", 1.0)),
                          top_k=int(kwargs.get("top_k", 0) or 0), seed=int(kwargs.get("seed", 0) or 0))
