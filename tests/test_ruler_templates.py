"""Templates, answer prefixes and needle formats, character for character (NVIDIA/RULER constants.py, niah.py),
and the structure of each family's samples."""
import re
from collections import Counter

import numpy as np
import pytest

from tasks import get_task
from tasks.offline_tokenizers import OFFLINE_TOKENIZERS
from tasks.ruler import constants as C
from tasks.ruler.niah import join_query

# The strings as they appear in NVIDIA/RULER scripts/data/synthetic/constants.py (written out again here, so a
# change to constants.py has to be a change to this test too).
RULER_NIAH = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
              "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
              "{type_needle_v} for {query} mentioned in the provided text?")
RULER_NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
RULER_VT = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
            "Question: Find all variables that are assigned the value {query} in the text above.")
RULER_VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
                   "are assigned the value {query}, they are: ")
RULER_CWE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
             "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?")
RULER_CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
RULER_FWE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
             "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
             "the dots '....'. What are the three most frequently appeared words in the above coded text?")
RULER_FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def test_templates_character_for_character():
    assert C.NIAH_TEMPLATE == RULER_NIAH
    assert C.NIAH_ANSWER_PREFIX == RULER_NIAH_PREFIX
    assert C.VT_TEMPLATE == RULER_VT and C.VT_ANSWER_PREFIX == RULER_VT_PREFIX
    assert C.CWE_TEMPLATE == RULER_CWE and C.CWE_ANSWER_PREFIX == RULER_CWE_PREFIX
    assert C.FWE_TEMPLATE == RULER_FWE and C.FWE_ANSWER_PREFIX == RULER_FWE_PREFIX
    assert C.NIAH_NEEDLE == "One of the special magic {type_needle_v} for {key} is: {value}."
    assert C.TOKENS_TO_GENERATE == {"niah": 128, "variable_tracking": 30, "common_words_extraction": 120,
                                    "freq_words_extraction": 50, "qa": 32}
    from tasks.haystacks import NOISE_UNIT
    assert NOISE_UNIT == NOISE


def test_singular_wording_is_rulers_replacement_rule():
    joined = RULER_NIAH + RULER_NIAH_PREFIX
    for old, new in [("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")]:
        joined = joined.replace(old, new)
    assert joined == C.NIAH_TEMPLATE_SINGULAR + C.NIAH_ANSWER_PREFIX_SINGULAR


def test_depths_are_rulers():
    assert list(C.DEPTHS) == list(np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int))


def test_query_join():
    assert join_query(["a"]) == "a"
    assert join_query(["a", "b"]) == "a, and b"
    assert join_query(["a", "b", "c", "d"]) == "a, b, c, and d"


@pytest.fixture(scope="module")
def tok():
    return OFFLINE_TOKENIZERS["gpt-neox"]()


def test_niah_single_sample_text(tok):
    s = get_task("niah_single_1").build_samples(tok, 1024, 1, seed=5)[0]
    head = ("A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you "
            "about the number afterwards.\n")
    assert s.input.startswith(head)
    key = re.fullmatch(r" The special magic number for (\S+) mentioned in the provided text is", s.answer_prefix)[1]
    assert s.input.endswith(f"\nWhat is the special magic number for {key} mentioned in the provided text?")
    needle = f"One of the special magic numbers for {key} is: {s.outputs[0]}."
    assert s.input.count(needle) == 1 and s.input.count("One of the special magic") == 1
    assert re.fullmatch(r"[1-9]\d{6}", s.outputs[0])
    lines = s.input[len(head):].split("\n")[:-1]
    assert set(lines) == {NOISE, needle}
    assert s.haystack == "noise"
    assert s.token_position_answer is not None and s.token_position_answer > s.needle_depth_tokens[0]


def test_niah_multi_sample_text(tok):
    s = get_task("niah_multiquery").build_samples(tok, 2048, 1, seed=5)[0]
    assert s.input.startswith("Some special magic numbers are hidden within the following text. Make sure to "
                              "memorize it. I will quiz you about the numbers afterwards.\n")
    m = re.fullmatch(r" The special magic numbers for (.+) mentioned in the provided text are", s.answer_prefix)
    keys = re.fullmatch(r"(\S+), (\S+), (\S+), and (\S+)", m[1]).groups()
    assert s.input.endswith(f"\nWhat are all the special magic numbers for {m[1]} mentioned in the provided text?")
    for key, value in zip(keys, s.outputs, strict=True):
        assert s.input.count(f"One of the special magic numbers for {key} is: {value}.") == 1
    assert s.haystack == "milton-areopagitica" and len(s.haystack_sha256) == 64


def test_multikey_needle_haystack_and_uuid_keys(tok):
    s = get_task("niah_multikey_3").build_samples(tok, 2048, 1, seed=2)[0]
    uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    body = s.input.split("\n")[1:-1]
    assert len(body) > 10 and all(re.fullmatch(rf"One of the special magic uuids for {uuid} is: {uuid}\.", line)
                                  for line in body)
    key = re.search(rf"for ({uuid}) mentioned", s.answer_prefix)[1]
    assert sum(1 for line in body if f"for {key} is:" in line) == 1
    assert s.outputs[0] in s.input


def test_multivalue_references_are_all_values(tok):
    s = get_task("niah_multivalue").build_samples(tok, 2048, 1, seed=4)[0]
    key = re.search(r"numbers for (\S+) mentioned", s.answer_prefix)[1]
    found = re.findall(rf"One of the special magic numbers for {re.escape(key)} is: (\d+)\.", s.input)
    assert sorted(found) == sorted(s.outputs) and len(found) == 4


def test_vt_sample_structure(tok):
    s = get_task("vt").build_samples(tok, 2048, 1, seed=9)[0]
    icl, question = s.input.split("\n\nMemorize and track", 1)
    assert icl.startswith("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n")
    # RULER appends " " + answer to a prefix that ends in a space: the double space is the benchmark's
    assert re.search(r"they are:  [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3}$", icl)
    assert "12345" not in icl  # the example's value is re-drawn per sample
    m = re.fullmatch(r" Answer: According to the chain\(s\) of variable assignment in the text above, 5 variables "
                     r"are assigned the value (\d{5}), they are: ", s.answer_prefix)
    value = m[1]
    a, b, c, d, e = s.outputs
    chain = [f"VAR {a} = {value}", f"VAR {b} = VAR {a} ", f"VAR {c} = VAR {b} ", f"VAR {d} = VAR {c} ",
             f"VAR {e} = VAR {d} "]
    lines = question.split("\n")
    positions = [lines.index(stmt) for stmt in chain]
    assert positions == sorted(positions)
    assert question.endswith(f"\nQuestion: Find all variables that are assigned the value {value} in the text above.")


@pytest.mark.parametrize("length,common,uncommon", [(2048, 6, 1), (4096, 30, 3)])
def test_cwe_frequencies(tok, length, common, uncommon):
    s = get_task("cwe").build_samples(tok, length, 1, seed=1)[0]
    main = s.input.split("\n")[-2]
    words = re.findall(r"\d+\. (\S+)", main)
    counts = Counter(words)
    assert all(counts[w] == common for w in s.outputs) and len(s.outputs) == 10
    assert all(c == uncommon for w, c in counts.items() if w not in s.outputs)
    numbers = [int(n) for n in re.findall(r"(\d+)\. \S+", main)]
    assert numbers == list(range(1, len(numbers) + 1))
    assert s.answer_prefix == RULER_CWE_PREFIX


def test_fwe_answer_is_most_frequent(tok):
    s = get_task("fwe").build_samples(tok, 4096, 1, seed=1)[0]
    context = s.input[len("Read the following coded text and track the frequency of each coded word. Find the three "
                          "most frequently appeared coded words. "):].split("\nQuestion:")[0]
    ranked = [w for w, _ in Counter(context.split(" ")).most_common()]
    assert ranked[0] == "..." and ranked[1:4] == s.outputs


def test_custom_haystack_file_is_used_and_recorded(tok, tmp_path):
    import hashlib
    import json

    text = " ".join(f"Sentence number {i} talks about the weather in town." for i in range(3000))
    path = tmp_path / "my_essays.json"
    path.write_text(json.dumps({"text": text}))
    s = get_task("niah_single_2").build_samples(tok, 1024, 1, seed=1, haystack_file=str(path))[0]
    assert "talks about the weather" in s.input and "AREOPAGITICA" not in s.input
    assert s.haystack == "my_essays" and s.haystack_sha256 == hashlib.sha256(text.encode()).hexdigest()
