"""Inputs start with BOS exactly where lm-eval's HFLM puts one: on a tokenizer that adds BOS by default (Llama,
Mistral), our plugin's log-likelihoods, rolling log-likelihoods and greedy generations equal HFLM's on the same
weights; bos=false in a spec matches HFLM's add_bos_token=False."""
from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

pytest.importorskip("lm_eval")


def import_hflm():
    """lm-eval's HFLM. It imports accelerate (its multi-process launcher), which this project does not depend on;
    given a model instance and batch size 1, HFLM never calls it, so a missing accelerate gets a stand-in for the
    import only (removed again, so no other test sees it)."""
    if importlib.util.find_spec("accelerate") is not None:
        from lm_eval.models.huggingface import HFLM

        return HFLM
    import transformers  # noqa: F401 - imported first: it probes for accelerate itself and must find none

    stub, utils = types.ModuleType("accelerate"), types.ModuleType("accelerate.utils")
    for name in ("Accelerator", "InitProcessGroupKwargs", "find_executable_batch_size"):
        setattr(stub, name, None)
    utils.get_max_memory = None
    sys.modules.update({"accelerate": stub, "accelerate.utils": utils})
    try:
        from lm_eval.models.huggingface import HFLM
    finally:
        del sys.modules["accelerate"], sys.modules["accelerate.utils"]
    return HFLM


HFLM = import_hflm()

from lm_eval.api.instance import Instance  # noqa: E402

from harness.bundled import BPE_4K  # noqa: E402
from harness.lm_eval_plugin import HarnessLM  # noqa: E402
from harness.model import EvalModel  # noqa: E402

REQUESTS = [("The grass is green. The sky", " is blue."), ("Question: what colour is the sun?\nAnswer:", " yellow"),
            ("Here we go ", "there and back again"), ("", "Once upon a time there was a river.")]
DOCUMENT = " ".join(f"Sentence {i} is about gardens, rivers and the sun." for i in range(16))   # > 1 window


def bos_adding_tokenizer():
    """The bundled byte-level BPE with a separate <s> that its post-processor puts first, as Llama's does."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_file(str(BPE_4K / "tokenizer.json"))
    raw.add_special_tokens(["<s>"])
    bos = raw.token_to_id("<s>")
    raw.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def pair():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = bos_adding_tokenizer()
    assert tok.encode("Hello")[0] == tok.bos_token_id != tok.eos_token_id     # adds BOS by default
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=96,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(config).eval()

    def ours(add_bos=None):
        model = EvalModel(name="tiny-llama", family="transformer", lm=lm, tokenizer=tok, device=torch.device("cpu"),
                          dtype=torch.float32, source="test", backend="torch", state_floats=0, max_length=96,
                          add_bos=add_bos)
        return HarnessLM(model=model)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # a d=32 model: intra-op threads only contend on a shared CPU
    yield ours, lambda **kw: HFLM(pretrained=lm, tokenizer=tok, batch_size=1, device="cpu", **kw)
    torch.set_num_threads(threads)


def instances(kind: str, args: list) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@pytest.mark.parametrize("add_bos", [None, False])
def test_loglikelihoods_equal_hflm_on_a_tokenizer_that_adds_bos(pair, add_bos):
    ours, hflm = pair
    ref = hflm() if add_bos is None else hflm(add_bos_token=add_bos)
    mine = ours(add_bos)
    assert mine.model.input_bos is (add_bos is None)
    got = mine.loglikelihood(instances("loglikelihood", REQUESTS))
    want = ref.loglikelihood(instances("loglikelihood", REQUESTS))
    for (lp, greedy), (ref_lp, ref_greedy) in zip(got, want, strict=False):
        assert lp == pytest.approx(ref_lp, abs=1e-4) and greedy == ref_greedy
    assert len(mine.rolling_windows(DOCUMENT)) > 1
    rolling = mine.loglikelihood_rolling(instances("loglikelihood_rolling", [(DOCUMENT,)]))
    ref_rolling = ref.loglikelihood_rolling(instances("loglikelihood_rolling", [(DOCUMENT,)]))
    assert rolling[0] == pytest.approx(ref_rolling[0], abs=1e-3)


def test_generations_equal_hflm_on_a_tokenizer_that_adds_bos(pair):
    ours, hflm = pair
    prompts = [("The grass is green. The sky is", {"until": ["\n"], "max_gen_toks": 12, "do_sample": False}),
               ("Here we go", {"until": ["."], "max_gen_toks": 12, "do_sample": False})]
    assert ours().generate_until(instances("generate_until", prompts)) == \
        hflm().generate_until(instances("generate_until", prompts))
