"""Every registry model as an lm-eval LM: `@register_model("harness")`, delegating to EvalModel.

    lm_eval.simple_evaluate(model="harness", model_args="spec=gdn2-tiny-random,device=cpu", tasks=[...])
    python -m harness.lm_eval_cli --model harness --model_args spec=gdn2-tiny-random --tasks piqa

model_args: spec (a registry spec: bundled name, family=path, checkpoint folder), device, dtype, tokenizer,
allow_longer_context, max_length (window of loglikelihood_rolling), rolling ("windows" | "carry"),
truncate_input_to (left-truncate every input to this many tokens, recorded), segment, share_prefixes (false: every
loglikelihood request scored whole, no shared contexts). In Python, `model=` takes an
already loaded EvalModel instead of a spec.

Semantics, request by request. batch_size (lm-eval's --batch_size, or the loaded EvalModel's own when "auto" or
absent) requests run together, with EvalModel's batching (harness/model.py): no padding enters a recurrent state,
the choices of one question run their shared context once (our models that mask padding, where it pays), and the results
equal batch size 1's. Inputs get special tokens as HFLM gives them (EvalModel.encode_input: the tokenizer's
default, e.g. Llama's BOS, unless the spec says bos=true|false):
- loglikelihood: EvalModel.split_request's tokenisation (lm-eval's _encode_pair: trailing context whitespace moved
  to the continuation, the context encoded alone, the continuation = what the whole string adds past it, empty
  context -> prefix token); the whole input runs with the state carried, no truncation. A model with a hard
  context limit refuses a longer input
  (ContextTooLongError) unless allow_longer_context.
- loglikelihood_rolling: lm-eval's own semantics (what HFLM does): the document is cut into disjoint windows of
  max_length predicted tokens (lm_eval.utils.get_rolling_token_windows, context_len=1), each window scored from a
  fresh state, the first conditioned on the prefix token. This is what the wikitext numbers of every lm-eval paper
  mean, and it puts a recurrent model and a transformer on the same footing. max_length: the model_arg, else the
  model's hard limit, else its training length, else 2048. rolling=carry runs the whole document in one pass with
  the state carried instead (EvalModel.loglikelihood_rolling): longer context than lm-eval's, not comparable to
  published numbers; position-bucketed perplexity (tasks/perplexity.py) is the tool for length extrapolation.
- generate_until: greedy, stops at EOS, at the first of `until` (the text is cut before it) or after max_gen_toks
  (default 256, lm-eval's); sampling arguments are ignored (greedy is what every paper table uses), with a warning.
- truncate_input_to=N: the input (context, plus the continuation for loglikelihood) keeps its last N tokens, cut on
  the left as the "Just read twice" suite does at 2K; every cut is recorded in `self.truncations` keyed by the
  context string (input tokens before, tokens kept), so results can say how many samples were cut.
"""
from __future__ import annotations

import logging
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from harness.model import EvalModel

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048      # lm-eval's HFLM default when a model states no length
DEFAULT_MAX_GEN_TOKS = 256     # lm-eval's default for generate_until


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no", ""):
            return False
        raise ValueError(f"expected a boolean (true/false), got {value!r}")
    return bool(value)


@register_model("harness", "gdn2-harness")
class HarnessLM(LM):
    """lm-eval LM over an EvalModel (see the module docstring for the semantics of each request type)."""

    def __init__(self, spec: str | None = None, model: EvalModel | None = None, device: str = "auto",
                 dtype: str = "auto", tokenizer: str | None = None, allow_longer_context: bool = False,
                 max_length: int | None = None, rolling: str = "windows", truncate_input_to: int | None = None,
                 segment: int | None = None, share_prefixes: Any = None, batch_size: Any = None,
                 max_batch_size: Any = None, **unused: Any) -> None:
        super().__init__()
        if unused:
            log.warning("harness LM: ignoring model_args %s (not used by this LM)", sorted(unused))
        if max_batch_size not in (None, 1, "1"):
            log.warning("harness LM: ignoring max_batch_size=%r (batch_size is the batch size)", max_batch_size)
        if model is None:
            if not spec:
                raise ValueError("harness LM needs model_args spec=<bundled name | family=path | checkpoint folder>")
            from harness.registry import load_model
            model = load_model(str(spec), device=device or "auto", dtype=dtype or "auto", tokenizer=tokenizer,
                               allow_longer_context=_as_bool(allow_longer_context))
        elif _as_bool(allow_longer_context):
            model.allow_longer_context = True
        if rolling not in ("windows", "carry"):
            raise ValueError(f"rolling must be 'windows' (lm-eval's disjoint windows) or 'carry'; got {rolling!r}")
        if segment:
            model.segment = int(segment)
        if share_prefixes is not None:
            model.share_prefixes = _as_bool(share_prefixes)
        if batch_size not in (None, "auto"):
            if int(batch_size) < 1:
                raise ValueError(f"batch_size must be a positive integer or 'auto'; got {batch_size!r}")
            model.batch_size = int(batch_size)
        self.model = model
        self.rolling = rolling
        self.truncate_input_to = int(truncate_input_to) if truncate_input_to else None
        self._max_length = int(max_length) if max_length else None
        self._device = model.device
        self.truncations: dict[str, tuple[int, int]] = {}
        self._warned_sampling = False

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "HarnessLM":
        """lm-eval's CLI adds batch_size / max_batch_size / device; model_args win where both name a key."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "HarnessLM":
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ---------------------------------------------------------------- identity
    @property
    def max_length(self) -> int:
        """Window length (predicted tokens per window) of loglikelihood_rolling."""
        if self._max_length:
            return self._max_length
        if self.model.max_length:
            return self.model.max_length      # as HFLM: a window feeds max_length tokens (the last is only predicted)
        return self.model.trained_length or DEFAULT_MAX_LENGTH

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.model.tokenizer, "name_or_path", self.model.name)).replace("/", "__")

    def describe(self) -> dict:
        """What results should record about this LM (model identity plus the request semantics in force)."""
        return {**self.model.describe(), "batch_size": self.model.batch_size, "rolling": self.rolling,
                "rolling_window": self.max_length if self.rolling == "windows" else None,
                "truncate_input_to": self.truncate_input_to}

    # ---------------------------------------------------------------- helpers
    def _truncate(self, key: str, ids: list[int], keep_at_least: int = 0) -> list[int]:
        """Left-truncate ids to truncate_input_to tokens (never below keep_at_least), recording the cut."""
        limit = self.truncate_input_to
        if limit is None or len(ids) <= limit:
            return ids
        keep = max(limit, keep_at_least)
        self.truncations[key] = (len(ids), keep)
        return ids[len(ids) - keep:]

    def _progress(self, items, desc: str, total: int | None = None, step: int = 1):
        total = len(items) if total is None else total
        bar = tqdm(total=total, desc=f"{self.model.name} {desc}", disable=total < 20, leave=False)
        for item in items:
            yield item
            bar.update(min(step, total - bar.n))
        bar.close()

    # ---------------------------------------------------------------- lm-eval API
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        scored = []
        for request in requests:
            context, continuation = request.args
            context_ids, continuation_ids = self.model.split_request(context, continuation)
            ids = self._truncate(context, context_ids + continuation_ids, keep_at_least=len(continuation_ids) + 1)
            scored.append((ids, len(ids) - len(continuation_ids)))
        results = []
        for request, (logprobs, greedy) in zip(requests, self._score(scored, "loglikelihood"), strict=False):
            result = (float(logprobs.sum()), bool(greedy.all()))
            self.cache_hook.add_partial("loglikelihood", request.args, result)
            results.append(result)
        return results

    def _score(self, scored: list[tuple[list[int], int]], desc: str) -> list:
        """EvalModel.token_logprobs_many over (ids, score_from) requests, in pieces of a few batches so that the
        progress bar moves."""
        step = 8 * self.model.batch_size
        out = []
        for start in self._progress(range(0, len(scored), step), desc, total=len(scored), step=step):
            out += self.model.token_logprobs_many(scored[start:start + step])
        return out

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """(context ids, predicted ids) of each disjoint window of text, exactly as lm-eval's HFLM builds them."""
        windows = get_rolling_token_windows(token_list=self.model.encode_input(text),
                                            prefix_token=self.model.prefix_token_id,
                                            max_seq_len=self.max_length, context_len=1)
        return [make_disjoint_window(w) for w in windows]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [request.args[0] for request in requests]
        if self.rolling == "carry":
            totals = self.model.loglikelihood_rolling(texts)
        else:
            windows = [(i, context_ids + predicted_ids, len(context_ids)) for i, text in enumerate(texts)
                       for context_ids, predicted_ids in self.rolling_windows(text)]
            totals = [0.0] * len(texts)
            for (i, _, _), (logprobs, _) in zip(windows, self._score([(ids, s) for _, ids, s in windows],
                                                                      "loglikelihood_rolling"), strict=False):
                totals[i] += float(logprobs.sum())
        for text, total in zip(texts, totals, strict=False):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests sharing stop strings and max_gen_toks are decoded together (self.model.batch_size at a time)."""
        groups: dict[tuple, list[tuple[int, list[int]]]] = {}
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen_toks = int(gen_kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            if (gen_kwargs.get("do_sample") or gen_kwargs.get("temperature", 0)) and not self._warned_sampling:
                log.warning("harness LM decodes greedily; ignoring sampling arguments %s", gen_kwargs)
                self._warned_sampling = True
            prompt_ids = self.model.encode_input(context) if context else [self.model.prefix_token_id]
            groups.setdefault((tuple(until), max_gen_toks), []).append((i, self._truncate(context, prompt_ids)))
        results: list = [None] * len(requests)
        for (until, max_gen_toks), members in groups.items():
            texts = self.model.greedy_texts([ids for _, ids in members], max_gen_toks, list(until))
            for (i, _), text in zip(members, texts, strict=False):
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
                results[i] = text
        return results
