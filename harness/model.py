"""EvalModel: the one interface every model family is evaluated through.

An adapter hands over a causal LM module with the transformers calling convention

    lm(input_ids=[B, T] LongTensor, past_key_values=cache | None, use_cache=bool, logits_to_keep=int)
        -> object with .logits [B, T', vocab] and .past_key_values

and a tokenizer; everything else (log-likelihoods, greedy generation with the recurrent state carried, segment-wise
scoring of long texts) is written once, here.

Batches (batch_size > 1, the *_many methods and those built on them) never let padding into a recurrent state:
- scoring right-pads a batch of sequences (sorted by length) and reads each row only at its real positions; the
  models are causal, so padding after a sequence cannot change its earlier positions. For models that mask left
  padding exactly, requests that share their unscored prefix (the context of a multiple-choice question) run it
  once, left-padded, and score each continuation from a copy of its state, where that saves enough tokens;
- generation prefills each prompt on its own and stacks the per-sample caches along the batch axis
  (harness/batching.py), or, for models that mask left padding exactly (masks_left_padding: our GDN-2, Gated
  DeltaNet, KDA, Mamba-2 and Mamba-3 models without attention layers), on CUDA prefills the batch together left-padded
  (batched_prefill); then it decodes all samples together one token per step; a sample that stops drops out.
Both give the batch-1 results (up to floating-point summation order), tested per family in tests/test_batched_eval.py.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from harness.batching import (
    DecodeBatch,
    RecurrentBatch,
    batch_of_equal_lengths,
    cache_signature,
    select_rows,
    stack_caches,
)
from harness.graph_decode import MIN_TOKENS_FOR_GRAPH, StaticStep, static_step_possible

log = logging.getLogger(__name__)

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
    batch_size: int = 1                 # sequences per forward pass in the *_many methods (1: one at a time)
    # greedy steps from static buffers and a CUDA graph (harness/graph_decode.py): None = on CUDA where the cache
    # allows it, True = wherever the cache allows it (on the CPU without the graph), False = never
    static_decode: bool | None = None
    # the model's forward leaves every state unchanged over left padding given an attention mask (our GDN-2, Gated
    # DeltaNet, KDA, Mamba-2 and Mamba-3 models without attention layers: tests/test_gdn2_padding.py,
    # test_baselines_fla.py, test_baselines_mamba_models.py), so generate_ids_many may prefill a batch together,
    # left-padded, and scoring may run shared prefixes once
    masks_left_padding: bool = False
    # prefill a batch together where the model allows it: None = on CUDA (on the 2-core CPU a batch gains nothing:
    # docs/efficiency.md), True = wherever allowed, False = never (each prompt alone, caches stacked)
    batched_prefill: bool | None = None
    # score requests that share a prefix by running it once where that pays (_score_shared_prefixes); False: every
    # request whole
    share_prefixes: bool = True

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
    def _forward(self, ids: torch.Tensor, cache, keep: int, **step_kwargs):
        out = self.lm(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=keep, **step_kwargs)
        if self.check_finite and not bool(torch.isfinite(out.logits).all()):
            raise NonFiniteLogitsError(
                f"{self.name}: NaN/Inf in the logits of a forward pass over {ids.shape[1]} tokens")
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
        """lm-eval semantics: (sum log p(continuation | context), whether greedy decoding reproduces it);
        self.batch_size requests per forward pass."""
        scored = []
        for context, continuation in requests:
            context_ids, continuation_ids = self.split_request(context, continuation)
            scored.append((context_ids + continuation_ids, len(context_ids)))
        return [(float(lp.sum()), bool(greedy.all())) for lp, greedy in self.token_logprobs_many(scored)]

    # ---------------------------------------------------------------- batched scoring
    @torch.no_grad()
    def token_logprobs_many(self, requests: Sequence[tuple[Sequence[int], int]], segment: int | None = None,
                            batch_size: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """token_logprobs(ids, score_from) of each (ids, score_from) request, in request order, batch_size
        (None: self.batch_size) requests of similar length per forward pass, right-padded. With batch_size > 1,
        requests whose unscored tokens start with the same prefix (a multiple-choice question's context) may run
        that prefix once (_score_shared_prefixes)."""
        batch_size = batch_size or self.batch_size
        results: list = [None] * len(requests)
        rest = self._score_shared_prefixes(requests, segment, batch_size, results) if batch_size > 1 \
            else list(range(len(requests)))
        for group in length_groups([len(requests[i][0]) for i in rest], batch_size):
            group = [rest[i] for i in group]
            if len(group) == 1:
                ids, score_from = requests[group[0]]
                results[group[0]] = self.token_logprobs(ids, score_from, segment)
                continue
            scored = self._score_padded([requests[i] for i in group], segment)
            for i, (logprobs, argmax) in zip(group, scored, strict=True):
                results[i] = _with_greedy(requests[i], logprobs, argmax)
        return results

    def _score_shared_prefixes(self, requests: Sequence[tuple[Sequence[int], int]], segment: int | None,
                               batch_size: int, results: list) -> list[int]:
        """Score the requests that share their prefix ids[:score_from - 1] with another request: the prefixes run
        once, batch_size at a time, left-padded (models that mask left padding exactly, masks_left_padding), then each
        request's tail ids[score_from - 1:] is scored from a copy of its prefix's state, batch_size tails per
        forward pass. Only where that saves at least SHARED_PREFIX_SAVING of the tokens scoring each request whole
        would feed (the extra prefill passes cost more than they save below it). Fills results[i] for the requests
        it scores and returns the indices of the others."""
        from gdn2.cache import RecurrentCache

        if not (self.share_prefixes and self.masks_left_padding) or self.batched_prefill is False:
            return list(range(len(requests)))
        by_prefix: dict[tuple[int, ...], list[int]] = {}
        for i, (ids, score_from) in enumerate(requests):
            if score_from >= 2:
                by_prefix.setdefault(tuple(ids[:score_from - 1]), []).append(i)
        shared = [prefix for prefix, members in by_prefix.items() if len(members) > 1]
        saved = sum(len(prefix) * (len(by_prefix[prefix]) - 1) for prefix in shared)
        if saved < SHARED_PREFIX_SAVING * sum(len(ids) - 1 for ids, _ in requests):
            return list(range(len(requests)))
        done: set[int] = set()
        for group in length_groups([len(p) for p in shared], batch_size):
            prefixes = [shared[j] for j in group]
            _, prefilled = self._prefill_left_padded([list(p) for p in prefixes], segment)
            rows = [(row, i) for row, prefix in enumerate(prefixes) for i in by_prefix[prefix]]
            tails = [(requests[i][0][requests[i][1] - 1:], 1) for _, i in rows]
            for chunk in length_groups([len(ids) for ids, _ in tails], batch_size):
                index = torch.tensor([rows[c][0] for c in chunk])
                cache = RecurrentCache(len(prefilled.states))
                cache.states = [select_rows(state, index) for state in prefilled.states]
                cache.seen_tokens = prefilled.seen_tokens
                scored = self._score_padded([tails[c] for c in chunk], segment, cache=cache,
                                            seen=max(len(prefixes[rows[c][0]]) for c in chunk))
                for c, (logprobs, argmax) in zip(chunk, scored, strict=True):
                    i = rows[c][1]
                    results[i] = _with_greedy(requests[i], logprobs, argmax)
                    done.add(i)
        return [i for i in range(len(requests)) if i not in done]

    def next_token_argmax_many(self, sequences: Sequence[Sequence[int]], segment: int | None = None,
                               batch_size: int | None = None) -> list[list[int]]:
        """Teacher-forced greedy predictions: out[i][t] = argmax p(. | sequences[i][:t + 1]) for t < len - 1,
        batch_size (None: self.batch_size) sequences per forward pass."""
        results: list = [None] * len(sequences)
        for group in length_groups([len(ids) for ids in sequences], batch_size or self.batch_size):
            scored = self._score_padded([(sequences[i], 1) for i in group], segment)
            for i, (_, argmax) in zip(group, scored, strict=False):
                results[i] = argmax.tolist()
        return results

    @torch.no_grad()
    def _score_padded(self, requests: Sequence[tuple[Sequence[int], int]], segment: int | None = None,
                      cache: Any = None, seen: int = 0):
        """(log p(ids[t] | ids[:t]) float64 CPU, argmax of that prediction long CPU) for t in [score_from, len(ids))
        of each request, all requests in one right-padded batch run in segments with the cache carried. Row r is
        read only at its real positions; the padding after it never reaches them (causal models). The scored
        positions of all rows are scored together (one log-softmax per SCORE_POSITIONS of them) and copied to the
        CPU once. cache: the batch's state before ids (row r: what request r's ids continue), holding at most
        `seen` tokens."""
        segment = segment or self.segment
        for ids, score_from in requests:
            if not 1 <= score_from <= len(ids) - 1:
                raise ValueError(f"score_from must be in [1, {len(ids) - 1}] for {len(ids)} tokens; got {score_from}")
            self.check_length(seen + len(ids) - 1)
        longest = max(len(ids) for ids, _ in requests)
        pad = int(requests[0][0][0])                                   # any real token id: it is never read
        tokens = torch.tensor([list(ids) + [pad] * (longest - len(ids)) for ids, _ in requests],
                              dtype=torch.long, device=self.device)
        inputs = tokens[:, :-1]                                        # position t predicts token t + 1
        first = [score_from - 1 for _, score_from in requests]        # inputs index of each row's first score
        ends = [len(ids) - 1 for ids, _ in requests]                   # one past each row's last scored input
        pieces: list[tuple[int, torch.Tensor, torch.Tensor]] = []      # (row, logprobs, argmax) on the device
        for start in range(0, inputs.shape[1], segment):
            end = min(start + segment, inputs.shape[1])
            rows = [r for r in range(len(requests)) if first[r] < end and ends[r] > start]
            kept_from = min((max(start, first[r]) for r in rows), default=end - 1)
            logits, cache = self._forward(inputs[:, start:end], cache, end - kept_from)
            spans = [(r, max(start, first[r]), min(end, ends[r])) for r in rows]
            for lp, am, chunk in _score_spans(logits, tokens, spans, kept_from):
                pieces += [(r, lp_r, am_r) for (r, _, _), lp_r, am_r in zip(chunk, lp, am, strict=True)]
        logprobs: list[list[torch.Tensor]] = [[] for _ in requests]
        argmax: list[list[torch.Tensor]] = [[] for _ in requests]
        if pieces:
            flat_lp = torch.cat([p[1] for p in pieces]).double().cpu()
            flat_am = torch.cat([p[2] for p in pieces]).cpu()
            sizes = [p[1].numel() for p in pieces]
            for (r, _, _), lp, am in zip(pieces, flat_lp.split(sizes), flat_am.split(sizes), strict=True):
                logprobs[r].append(lp)
                argmax[r].append(am)
        return [(torch.cat(lp), torch.cat(am)) for lp, am in zip(logprobs, argmax, strict=False)]

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
        requests = [([self.prefix_token_id] + self.encode_input(text), 1) for text in texts]
        return [float(lp.sum()) for lp, _ in self.token_logprobs_many(requests)]

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def generate_ids(self, prompt_ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = (),
                     segment: int | None = None, stop_when: Callable[[list[int]], bool] | None = None) -> list[int]:
        """Greedy decoding: chunkwise prefill in segments (None: self.segment), then one token at a time with the
        state carried. Stops at a token in stop_ids (not returned), or once stop_when(generated ids) is true."""
        self.check_length(len(prompt_ids) + max_new_tokens)
        logits, cache = self._prefill(prompt_ids, segment)
        return self._decode(DecodeBatch(cache), logits, max_new_tokens, stop_ids, stop_when)[0]

    @torch.no_grad()
    def generate_ids_many(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int] = (),
                          segment: int | None = None, stop_when: Callable[[list[int]], bool] | None = None,
                          batch_size: int | None = None) -> list[list[int]]:
        """generate_ids of each prompt, in prompt order, batch_size (None: self.batch_size) samples decoded together:
        the prompts are prefilled together left-padded (_use_batched_prefill) or each on its own with the caches
        stacked, and every step feeds one token per sample still running (stop_when is applied to each sample's
        own tokens). Samples whose caches cannot share a batch (harness/batching.py) are decoded in separate
        groups."""
        batch_size = batch_size or self.batch_size
        results: list = [None] * len(prompts)
        for group in length_groups([len(p) for p in prompts], batch_size):
            if len(group) == 1:
                results[group[0]] = self.generate_ids(prompts[group[0]], max_new_tokens, stop_ids, segment, stop_when)
                continue
            for i in group:
                self.check_length(len(prompts[i]) + max_new_tokens)
            for members, logits, batch in self._prefill_batches([prompts[i] for i in group], segment):
                decoded = self._decode(batch, logits, max_new_tokens, stop_ids, stop_when)
                for j, ids in zip(members, decoded, strict=True):
                    results[group[j]] = ids
        return results

    def _prefill_batches(self, prompts: Sequence[Sequence[int]], segment: int | None):
        """Prefill prompts for continuing them together: yields (indices into prompts, their last logits [n, vocab],
        a DecodeBatch of their caches). Prompts of one length run as one batch (no padding); others left-padded in
        one batch where the model masks padding exactly (_use_batched_prefill), else each prompt alone with the
        caches stacked, one batch per cache signature (harness/batching.py)."""
        if len(prompts) > 1 and len({len(p) for p in prompts}) == 1:
            logits, cache = self._prefill_equal_lengths(prompts, segment)
            batch = batch_of_equal_lengths(cache, len(prompts), len(prompts[0]))
            if batch is not None:
                yield list(range(len(prompts))), logits, batch
                return
        if self._use_batched_prefill():
            logits, cache = self._prefill_left_padded(prompts, segment)
            yield list(range(len(prompts))), logits, RecurrentBatch(cache)
            return
        prefilled = {i: self._prefill(p, segment) for i, p in enumerate(prompts)}
        for members in _stackable_groups({i: cache for i, (_, cache) in prefilled.items()}):
            logits = torch.cat([prefilled[i][0] for i in members], 0)
            caches = [prefilled.pop(i)[1] for i in members]
            batch = stack_caches(caches, [len(prompts[i]) for i in members]) if len(members) > 1 \
                else DecodeBatch(caches[0])
            del caches
            yield members, logits, batch

    def _prefill(self, prompt_ids: Sequence[int], segment: int | None) -> tuple[torch.Tensor, Any]:
        """Run a prompt through the model in segments; returns (last position's logits [1, vocab], cache)."""
        return self._prefill_equal_lengths([prompt_ids], segment)

    def _prefill_equal_lengths(self, prompts: Sequence[Sequence[int]], segment: int | None) -> tuple[torch.Tensor,
                                                                                                      Any]:
        """Run prompts of one length together (no padding), in segments with the cache carried; returns (each
        prompt's last logits [B, vocab], cache)."""
        segment = segment or self.segment
        tokens = torch.tensor([list(p) for p in prompts], dtype=torch.long, device=self.device)
        cache, logits = None, None
        for start in range(0, tokens.shape[1], segment):
            logits, cache = self._forward(tokens[:, start:start + segment], cache, 1)
        return logits[:, -1], cache

    def _use_batched_prefill(self) -> bool:
        allowed = self.batched_prefill if self.batched_prefill is not None else self.device.type == "cuda"
        return self.masks_left_padding and allowed

    def _prefill_left_padded(self, prompts: Sequence[Sequence[int]], segment: int | None) -> tuple[torch.Tensor, Any]:
        """Run prompts together, left-padded to the longest, in segments with the cache carried and an attention
        mask over the padding; returns (each prompt's last logits [B, vocab], the batched cache). Only for models
        whose forward leaves every state unchanged over padding (masks_left_padding)."""
        segment = segment or self.segment
        longest = max(len(p) for p in prompts)
        pad = int(prompts[0][0])                                       # any real token id: masked out
        tokens = torch.tensor([[pad] * (longest - len(p)) + list(p) for p in prompts], dtype=torch.long,
                              device=self.device)
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long,
                            device=self.device)
        cache, logits = None, None
        for start in range(0, longest, segment):
            end = min(start + segment, longest)
            logits, cache = self._forward(tokens[:, start:end], cache, 1, attention_mask=mask[:, :end])
        return logits[:, -1], cache

    def _decode(self, batch: DecodeBatch, logits: torch.Tensor, max_new_tokens: int, stop_ids: Sequence[int],
                stop_when: Callable[[list[int]], bool] | None) -> list[list[int]]:
        """Greedy decoding of a batch of prefilled samples (logits [B, vocab] of their last positions): one token
        per running sample per step; a sample stops at a token in stop_ids (not returned), after max_new_tokens,
        or once stop_when(its tokens) is true, and then leaves the batch."""
        if self._use_static_step(batch.cache, max_new_tokens):
            return self._decode_static(batch.cache, logits, max_new_tokens, stop_ids, stop_when)
        stop = set(int(s) for s in stop_ids)
        generated: list[list[int]] = [[] for _ in range(logits.shape[0])]
        running = list(range(logits.shape[0]))                 # the sample in each row of the batch
        for _ in range(max_new_tokens):
            next_ids = logits.argmax(-1).tolist()
            keep = []
            for row, (sample, token) in enumerate(zip(running, next_ids, strict=False)):
                if token in stop:
                    continue
                generated[sample].append(token)
                if len(generated[sample]) < max_new_tokens and not (stop_when is not None
                                                                    and stop_when(generated[sample])):
                    keep.append(row)
            if not keep:
                break
            if len(keep) < len(running):
                batch.keep(keep)
                running = [running[row] for row in keep]
            ids = torch.tensor([[next_ids[row]] for row in keep], dtype=torch.long, device=self.device)
            logits, batch.cache = self._forward(ids, batch.cache, 1, **batch.step_kwargs())
            logits = logits[:, -1]
            batch.advance()
        return generated

    def _use_static_step(self, cache: Any, max_new_tokens: int) -> bool:
        if self.static_decode is False or not static_step_possible(cache):
            return False
        return self.static_decode is True or (self.device.type == "cuda" and max_new_tokens >= MIN_TOKENS_FOR_GRAPH)

    def _decode_static(self, cache: Any, logits: torch.Tensor, max_new_tokens: int, stop_ids: Sequence[int],
                       stop_when: Callable[[list[int]], bool] | None) -> list[list[int]]:
        """_decode's tokens from a StaticStep (one CUDA graph replay per token on CUDA): the batch keeps its rows,
        a sample that stopped is computed on and ignored."""
        step = StaticStep(self.lm, cache)
        if self.device.type == "cuda":
            try:
                step.capture()
            except RuntimeError as err:     # a model whose step cannot be captured still decodes, eagerly
                step.graph = None
                log.warning("%s: CUDA graph capture of the decoding step failed (%s); decoding eagerly from static "
                            "buffers", self.name, err)
        stop = set(int(s) for s in stop_ids)
        generated: list[list[int]] = [[] for _ in range(logits.shape[0])]
        running = [True] * logits.shape[0]
        for _ in range(max_new_tokens):
            next_ids = logits.argmax(-1)
            for row, token in enumerate(next_ids.tolist()):
                if not running[row]:
                    continue
                if token in stop:
                    running[row] = False
                    continue
                generated[row].append(token)
                if len(generated[row]) == max_new_tokens or (stop_when is not None and stop_when(generated[row])):
                    running[row] = False
            if not any(running):
                break
            step.ids.copy_(next_ids[:, None])
            logits = step.run()
            if self.check_finite and not bool(torch.isfinite(logits).all()):
                raise NonFiniteLogitsError(f"{self.name}: NaN/Inf in the logits of a decoding step")
        return generated

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] | None = None) -> list[str]:
        """Greedy continuation of each prompt, cut at the first stop string (EOS always stops)."""
        return self.greedy_texts([self.encode_input(prompt) for prompt in prompts], max_new_tokens, stop)

    def greedy_text(self, prompt_ids: Sequence[int], max_new_tokens: int, stop: Sequence[str] | None = None) -> str:
        """Greedy continuation of prompt_ids as text: decoding stops at EOS, once a stop string appears, or after
        max_new_tokens; the text is cut before the first stop string."""
        return self.greedy_texts([prompt_ids], max_new_tokens, stop)[0]

    def greedy_texts(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     stop: Sequence[str] | None = None) -> list[str]:
        """greedy_text of each prompt, self.batch_size samples decoded together."""
        stops = [s for s in stop or () if s]
        eos = self.tokenizer.eos_token_id
        outputs = self.generate_ids_many(prompts, max_new_tokens, stop_ids=[eos] if eos is not None else [],
                                         stop_when=StopStrings(self.decode, stops) if stops else None)
        texts = []
        for ids in outputs:
            text = self.decode(ids)
            cuts = [text.index(s) for s in stops if s in text]
            texts.append(text[:min(cuts)] if cuts else text)
        return texts

    def describe(self) -> dict:
        """Identity of the model for result records."""
        return {
            "name": self.name, "family": self.family, "source": self.source, "backend": self.backend,
            "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
            "state_floats_per_layer": self.state_floats, "num_params_non_embedding": self.num_params(True),
            "max_length": self.max_length, "trained_length": self.trained_length, "input_bos": self.input_bos,
            **self.info,
        }


class StopStrings:
    """stop_when for generate_ids: whether the text of the generated ids contains a stop string. Each step decodes
    only the last `tail` ids (a stop string of n characters spans at most 4n byte-level tokens, plus the two it
    cuts at its ends), so the check costs the same at every length; a hit is confirmed on the whole text. A stop
    string that a tail would miss is found at a later step or not at all, which never changes the returned text:
    greedy_texts cuts the whole text at its first stop string."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stops: Sequence[str]):
        self.decode, self.stops = decode, list(stops)
        self.tail = max(4 * len(s) + 2 for s in self.stops)

    def __call__(self, generated: Sequence[int]) -> bool:
        text = self.decode(generated[-self.tail:])
        if not any(s in text for s in self.stops):
            return False
        text = self.decode(generated) if len(generated) > self.tail else text
        return any(s in text for s in self.stops)


def _with_greedy(request: tuple[Sequence[int], int], logprobs: torch.Tensor, argmax: torch.Tensor):
    """(logprobs, whether each scored token is the argmax) of a request (ids, score_from)."""
    ids, score_from = request
    return logprobs, argmax == torch.tensor(list(ids[score_from:]))


def length_groups(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices of lengths in groups of at most batch_size, longest first, so that a group's lengths are close."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _stackable_groups(caches: dict[int, Any]) -> list[list[int]]:
    """The keys of caches grouped by cache signature (an unstackable cache is a group of its own)."""
    groups: dict[Any, list[int]] = {}
    for i, cache in caches.items():
        signature = cache_signature(cache)
        groups.setdefault(signature if signature is not None else ("alone", i), []).append(i)
    return list(groups.values())


SCORE_POSITIONS = 4096     # scored positions per log-softmax in _score_spans (bounds its fp32 copy of the logits)
# _score_shared_prefixes runs shared prefixes once only where that saves this share of the tokens fed: the bundled
# gdn2-small on the 2-core CPU (docs/efficiency.md) scored arc_easy (a 4-way choice of short answers, 64% of the
# tokens saved) 1.6x faster and hellaswag (4 longer endings, 50%) 1.2x faster this way, piqa (2 long solutions, 20%)
# 1.5x slower
SHARED_PREFIX_SAVING = 0.4


def _score_spans(logits: torch.Tensor, tokens: torch.Tensor, spans: Sequence[tuple[int, int, int]], kept_from: int):
    """Yield (logprobs, argmax, group) per group of spans holding up to SCORE_POSITIONS positions: for each
    (row, a, b) of the group, log p(tokens[row, t + 1]) and the argmax of the prediction at inputs positions
    t in [a, b), read from logits [B, kept, vocab] whose column 0 is position kept_from; logprobs and argmax are
    lists of device tensors [b - a], one per span. One log-softmax per group, no copy to the CPU."""
    groups: list[list[tuple[int, int, int]]] = []
    size = 0
    for span in spans:
        if not groups or size + span[2] - span[1] > SCORE_POSITIONS:
            groups.append([])
            size = 0
        groups[-1].append(span)
        size += span[2] - span[1]
    for group in groups:
        rows = torch.cat([torch.full((b - a,), r, dtype=torch.long) for r, a, b in group]).to(logits.device)
        cols = torch.cat([torch.arange(a, b) for _, a, b in group]).to(logits.device)
        scores = logits[rows, cols - kept_from].float()                          # [positions, vocab]
        targets = tokens[rows, cols + 1]
        logprobs = scores.gather(-1, targets[:, None])[:, 0] - scores.logsumexp(-1)
        sizes = [b - a for _, a, b in group]
        yield list(logprobs.split(sizes)), list(scores.argmax(-1).split(sizes)), group
