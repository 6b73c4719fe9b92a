"""EvalModel: the one interface every model family is evaluated through.

An adapter hands over a causal LM module with the transformers calling convention

    lm(input_ids=[B, T] LongTensor, past_key_values=cache | None, use_cache=bool, logits_to_keep=int)
        -> object with .logits [B, T', vocab] and .past_key_values

and a tokenizer; everything else (log-likelihoods, greedy generation with the recurrent state carried, segment-wise
scoring of long texts) is written once, here. Batch size is 1 throughout: padding would leak into recurrent state.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

# Long inputs are fed in segments of this many tokens, the cache carried between them (exact for every family).
DEFAULT_SEGMENT = 2048


class ContextTooLongError(ValueError):
    """A request longer than the model's hard context limit."""


class NonFiniteLogitsError(FloatingPointError):
    """The model produced NaN or Inf logits (raised only when EvalModel.check_finite is on; the runner records it)."""


@dataclass
class EvalModel:
    """A loaded model behind the common interface.

    name: what results are filed under; family: registry family; source: where the weights came from;
    backend: which kernels run (e.g. "triton (ours)", "torch reference"); state_floats: recurrent state per layer;
    max_length: hard context limit in tokens (None: no hard limit, e.g. recurrent models);
    trained_length: the context the model was trained at, when known (informational).
    """

    name: str
    family: str
    lm: nn.Module
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    source: str
    backend: str
    state_floats: int
    max_length: int | None = None
    trained_length: int | None = None
    allow_longer_context: bool = False
    info: dict = field(default_factory=dict)
    segment: int = DEFAULT_SEGMENT      # default segment length for long inputs (the runner halves it after an OOM)
    check_finite: bool = False          # raise NonFiniteLogitsError when a forward pass returns NaN/Inf logits
    add_bos: bool | None = None         # inputs start with BOS: None = the tokenizer's default (lm-eval's HFLM rule)

    # ---------------------------------------------------------------- sizes
    def state_floats_per_layer(self) -> int:
        """Recurrent state size of one mixer layer in floats (0 for attention-only models)."""
        return self.state_floats

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding excludes input embeddings and the LM head (as papers count them)."""
        total = sum(p.numel() for p in self.lm.parameters())
        if not non_embedding:
            return total
        skip = {id(p) for m in (self.lm.get_input_embeddings(), self.lm.get_output_embeddings()) if m is not None
                for p in m.parameters()}
        return total - sum(p.numel() for p in self.lm.parameters() if id(p) in skip)

    # ---------------------------------------------------------------- tokens
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of text; no special tokens unless asked (then the tokenizer's own default, e.g. Llama's BOS)."""
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def encode_input(self, text: str) -> list[int]:
        """Token ids of a whole model input as lm-eval's HFLM encodes it (tok_encode): the tokenizer's special
        tokens (BOS for Llama/Mistral, none for GPT-NeoX) unless add_bos says otherwise; none when the text already
        starts with the prefix token's text."""
        prefix = self.tokenizer.decode([self.prefix_token_id]) if self.tokenizer.bos_token_id is not None \
            or self.tokenizer.eos_token_id is not None else ""
        if (prefix and text.startswith(prefix)) or self.add_bos is False:
            return self.encode(text)
        ids = self.encode(text, add_special_tokens=True)
        bos = self.tokenizer.bos_token_id
        return [int(bos)] + ids if self.add_bos and bos is not None and ids[:1] != [bos] else ids

    @property
    def input_bos(self) -> bool:
        """Whether inputs start with BOS under encode_input (recorded with the results)."""
        bos = self.tokenizer.bos_token_id
        return bos is not None and self.encode_input("a")[:1] == [bos]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def prefix_token_id(self) -> int:
        """Token that conditions an empty context (BOS, else EOS), as lm-eval does."""
        for token_id in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id):
            if token_id is not None:
                return int(token_id)
        raise ValueError(f"tokenizer of {self.name} has neither a BOS nor an EOS token to condition on")

    def check_length(self, num_tokens: int) -> None:
        """Refuse (never truncate) inputs past the model's hard limit unless the user opted in."""
        if self.max_length is not None and num_tokens > self.max_length and not self.allow_longer_context:
            raise ContextTooLongError(
                f"{self.name}: input of {num_tokens} tokens exceeds the model's context limit of {self.max_length}; "
                "shorten the input, or opt in with allow_longer_context=True (--allow-longer-context) to run past it"
            )

    # ---------------------------------------------------------------- forward
    def _forward(self, ids: torch.Tensor, cache, keep: int):
        out = self.lm(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=keep)
        if self.check_finite and not bool(torch.isfinite(out.logits).all()):
            raise NonFiniteLogitsError(f"{self.name}: NaN/Inf in the logits of a forward pass over {ids.shape[1]} tokens")
        return out.logits, out.past_key_values

    @torch.no_grad()
    def token_logprobs(self, ids: Sequence[int], score_from: int = 1, segment: int | None = None):
        """log p(ids[t] | ids[:t]) and whether ids[t] is the argmax, for t in [score_from, len(ids)).

        The sequence runs in segments of `segment` tokens with the cache carried, so memory stays bounded and only
        the scored positions' logits are kept (segment None: self.segment). Returns (logprobs [n] float64 CPU,
        greedy [n] bool CPU).
        """
        segment = segment or self.segment
        if not 1 <= score_from <= len(ids) - 1:
            raise ValueError(f"score_from must be in [1, {len(ids) - 1}] for {len(ids)} tokens; got {score_from}")
        self.check_length(len(ids) - 1)                          # the last token is scored, never fed
        tokens = torch.tensor(list(ids), dtype=torch.long, device=self.device)[None]
        cache, logprobs, greedy = None, [], []
        inputs = tokens[:, :-1]                                   # position t predicts token t + 1
        for start in range(0, inputs.shape[1], segment):
            end = min(start + segment, inputs.shape[1])
            first_scored = max(start, score_from - 1)             # inputs index whose prediction is scored
            keep = end - first_scored if first_scored < end else 1
            logits, cache = self._forward(inputs[:, start:end], cache, keep)
            if first_scored >= end:
                continue
            scores = logits[0].float()                            # [keep, vocab]; no second vocab-sized copy
            targets = tokens[0, first_scored + 1:end + 1]
            target_lp = scores.gather(-1, targets[:, None])[:, 0] - scores.logsumexp(-1)
            logprobs.append(target_lp.double().cpu())
            greedy.append((scores.argmax(-1) == targets).cpu())
        return torch.cat(logprobs), torch.cat(greedy)

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """lm-eval semantics: (sum log p(continuation | context), whether greedy decoding reproduces it)."""
        results = []
        for context, continuation in requests:
            context_ids, continuation_ids = self.split_request(context, continuation)
            lp, greedy = self.token_logprobs(context_ids + continuation_ids, score_from=len(context_ids))
            results.append((float(lp.sum()), bool(greedy.all())))
        return results

    def split_request(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation exactly as lm-eval's _encode_pair (causal LMs): trailing whitespace
        of the context moves to the continuation; the context ids are the context encoded alone (encode_input: BOS
        where lm-eval adds it), the continuation ids what encoding the whole string adds past that many tokens;
        empty context -> [prefix token] (or the continuation's first token when it is the prefix token)."""
        if not continuation:
            raise ValueError("loglikelihood request with an empty continuation")
        if not context:
            continuation_ids = self.encode(continuation)
            if continuation_ids[:1] == [self.prefix_token_id]:
                return continuation_ids[:1], continuation_ids[1:]
            return [self.prefix_token_id], continuation_ids
        trailing = len(context) - len(context.rstrip())
        if trailing:
            context, continuation = context[:-trailing], context[-trailing:] + continuation
        context_ids = self.encode_input(context)
        continuation_ids = self.encode_input(context + continuation)[len(context_ids):]
        if not continuation_ids:
            raise ValueError(f"{self.name}: continuation {continuation!r} adds no token to the context "
                             f"(...{context[-40:]!r}): its text merges into the context's last tokens")
        return context_ids, continuation_ids

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """Sum of log p over every token of each text, conditioned on the prefix token (lm-eval semantics,
        but the whole text in one pass with the state carried instead of disjoint windows)."""
        results = []
        for text in texts:
            ids = [self.prefix_token_id] + self.encode_input(text)
            lp, _ = self.token_logprobs(ids, score_from=1)
            results.append(float(lp.sum()))
        return results

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def generate_ids(self, prompt_ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = (),
                     segment: int | None = None, stop_when: Callable[[list[int]], bool] | None = None) -> list[int]:
        """Greedy decoding: chunkwise prefill in segments (None: self.segment), then one token at a time with the
        state carried. Stops at a token in stop_ids (not returned), or once stop_when(generated ids) is true."""
        segment = segment or self.segment
        self.check_length(len(prompt_ids) + max_new_tokens)
        tokens = torch.tensor(list(prompt_ids), dtype=torch.long, device=self.device)[None]
        cache, logits = None, None
        for start in range(0, tokens.shape[1], segment):
            logits, cache = self._forward(tokens[:, start:start + segment], cache, 1)
        generated: list[int] = []
        stop = set(int(s) for s in stop_ids)
        for _ in range(max_new_tokens):
            next_id = int(logits[0, -1].argmax())
            if next_id in stop:
                break
            generated.append(next_id)
            if len(generated) == max_new_tokens or (stop_when is not None and stop_when(generated)):
                break
            logits, cache = self._forward(torch.tensor([[next_id]], device=self.device), cache, 1)
        return generated

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] | None = None) -> list[str]:
        """Greedy continuation of each prompt, cut at the first stop string (EOS always stops)."""
        return [self.greedy_text(self.encode_input(prompt), max_new_tokens, stop) for prompt in prompts]

    def greedy_text(self, prompt_ids: Sequence[int], max_new_tokens: int, stop: Sequence[str] | None = None) -> str:
        """Greedy continuation of prompt_ids as text: decoding stops at EOS, once a stop string appears, or after
        max_new_tokens; the text is cut before the first stop string."""
        stops = [s for s in stop or () if s]
        eos = self.tokenizer.eos_token_id
        ids = self.generate_ids(prompt_ids, max_new_tokens, stop_ids=[eos] if eos is not None else [],
                                stop_when=(lambda generated: any(s in self.decode(generated) for s in stops))
                                if stops else None)
        text = self.decode(ids)
        cuts = [text.index(s) for s in stops if s in text]
        return text[:min(cuts)] if cuts else text

    def describe(self) -> dict:
        """Identity of the model for result records."""
        return {
            "name": self.name, "family": self.family, "source": self.source, "backend": self.backend,
            "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
            "state_floats_per_layer": self.state_floats, "num_params_non_embedding": self.num_params(True),
            "max_length": self.max_length, "trained_length": self.trained_length, "input_bos": self.input_bos,
            **self.info,
        }
