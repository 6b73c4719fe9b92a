"""RULER variable tracking (vt), after NVIDIA/RULER scripts/data/synthetic/variable_tracking.py.

- Chains: num_chains chains of num_hops + 1 distinct variables (5 upper-case letters); chain statements
  "VAR A = 12345", then "VAR B = VAR A " (RULER's trailing space kept) ...; the value is a 5-digit number.
- noise haystack: n noise lines; each chain's statements go in, in order, at line positions drawn without
  replacement; lines joined with "\\n", then ". \\n" -> ".\\n".
- One in-context example precedes the question (RULER always adds it): a chain with 3-letter variables and value
  12345 in a haystack sized to at most 500 tokens with the model's tokenizer, followed by its answer; for each
  sample its variable names and value are re-drawn. It is "\\n"-separated from the question as in RULER.
- references: the variables of the first chain.
"""
from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

from ..haystacks import NOISE_UNIT
from ..tokenization import TokenCounter
from .constants import VT_ANSWER_PREFIX, VT_TEMPLATE
from .length import Draft, find_num_units
from .niah import _join_tracking

ICL_MAX_TOKENS = 500
ICL_VALUE = "12345"


@dataclass(frozen=True)
class VTKnobs:
    type_haystack: str = "noise"
    num_chains: int = 1
    num_hops: int = 4

    def __post_init__(self):
        if self.type_haystack != "noise":
            raise ValueError("variable tracking is implemented on the noise haystack (RULER's vt row); "
                             f"got {self.type_haystack!r}")
        if self.num_chains < 1 or self.num_hops < 1:
            raise ValueError(f"num_chains and num_hops must be >= 1: {self}")


def _random_var(rng: random.Random, k: int) -> str:
    while True:
        var = "".join(rng.choices(string.ascii_uppercase, k=k))
        if var != "VAR":  # a variable named VAR would collide with the statement keyword
            return var


class VTFamily:
    unit = "line"

    def __init__(self, knobs: VTKnobs):
        self.knobs = knobs
        self.icl_text: str | None = None  # set by prepare()
        self._icl_vars: list[str] = []

    def min_units(self) -> int:
        return (self.knobs.num_hops + 1) * self.knobs.num_chains

    # -- chains --------------------------------------------------------------------------------------------------
    def _chains(self, rng: random.Random, is_icl: bool) -> tuple[list[list[str]], list[list[str]]]:
        k = 3 if is_icl else 5
        hops = min(10, self.knobs.num_hops) if is_icl else self.knobs.num_hops
        n_vars = (hops + 1) * self.knobs.num_chains
        all_vars: list[str] = []
        while len(all_vars) < n_vars:
            var = _random_var(rng, k)
            if var not in all_vars:
                all_vars.append(var)
        variables, chains = [], []
        for i in range(0, n_vars, hops + 1):
            chain_vars = all_vars[i:i + hops + 1]
            variables.append(chain_vars)
            value = ICL_VALUE if is_icl else str(rng.randint(10000, 99998))  # numpy randint(10000, 99999)
            chain = [f"VAR {chain_vars[0]} = {value}"]
            chain += [f"VAR {chain_vars[j + 1]} = VAR {chain_vars[j]} " for j in range(hops)]
            chains.append(chain)
        return variables, chains

    def _question(self, rng: random.Random, num_lines: int, is_icl: bool) -> tuple[str, str, list[str], list[int]]:
        variables, chains = self._chains(rng, is_icl)
        value = chains[0][0].split("=")[-1].strip()
        lines = [NOISE_UNIT] * num_lines
        marks: list[bool] = [False] * num_lines
        for c, chain in enumerate(chains):
            positions = sorted(rng.sample(range(len(lines)), len(chain)))
            for j, pos in enumerate(positions):
                lines.insert(pos + j, chain[j])
                marks.insert(pos + j, c == 0)
        # RULER replaces ". \n" by ".\n" in the joined context; noise lines end in "." without a space, so the
        # replacement never fires on this haystack, and character offsets stay valid.
        context, offsets = _join_tracking("\n", lines, [i for i, m in enumerate(marks) if m])
        context = context.replace(". \n", ".\n")
        num_v = (min(10, self.knobs.num_hops) if is_icl else self.knobs.num_hops) + 1
        text = VT_TEMPLATE.format(context=context, query=value)
        prefix = VT_ANSWER_PREFIX.format(num_v=num_v, query=value)
        ctx_offset = len(VT_TEMPLATE.split("{context}")[0])
        return text, prefix, variables[0], [ctx_offset + o for o in offsets]

    # -- in-context example --------------------------------------------------------------------------------------
    def prepare(self, counter: TokenCounter, icl_rng) -> None:
        """Build the in-context example with the model's tokenizer (at most ICL_MAX_TOKENS tokens)."""

        class _ICL:
            unit = "line"
            min_units = self.min_units

            def draft(_, rng, n):
                text, prefix, answer, _offsets = self._question(rng, n, is_icl=True)
                return Draft(text, prefix, answer)

        n, _ = find_num_units(_ICL(), counter, ICL_MAX_TOKENS, 0, lambda j: icl_rng(0), task="vt (in-context example)")
        text, prefix, answer, _ = self._question(icl_rng(0), n, is_icl=True)
        self.icl_text = text + prefix + " " + " ".join(answer) + "\n"
        self._icl_vars = answer

    def _randomize_icl(self, rng: random.Random) -> str:
        text = self.icl_text
        for var in self._icl_vars:
            text = re.sub(rf"\b{var}\b", _random_var(rng, len(var)), text)
        return text.replace(ICL_VALUE, str(rng.randint(10000, 99998)))

    def draft(self, rng: random.Random, num_units: int) -> Draft:
        if self.icl_text is None:
            raise RuntimeError("VTFamily.prepare(counter, rng) must run before drafting")
        icl = self._randomize_icl(rng) + "\n"
        text, prefix, answer, offsets = self._question(rng, num_units, is_icl=False)
        return Draft(icl + text, prefix, answer, [len(icl) + o for o in offsets], {"haystack_units": num_units})
