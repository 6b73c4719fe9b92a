"""Transformer family: Llama-style HF folders through transformers, the context limit (refusal or explicit
opt-in), cache-carried scoring and generation, and the baselines.common rebuild the doctor compares against."""
from __future__ import annotations

import pytest
import torch

from baselines.common import write_checkpoint_folder
from baselines.transformer import build_llama
from harness.bundled import BPE_4K
from harness.model import ContextTooLongError
from harness.registry import get_family, load_model

LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=4096,
             max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)


@pytest.fixture
def llama_folder(tmp_path):
    torch.manual_seed(0)
    lm = build_llama(LLAMA).eval()
    lm.save_pretrained(tmp_path / "llama")
    write_checkpoint_folder(tmp_path / "tok", {}, {}, BPE_4K)
    for f in (tmp_path / "tok").iterdir():
        if f.name.startswith("tokenizer"):
            (tmp_path / "llama" / f.name).write_bytes(f.read_bytes())
    return lm, tmp_path / "llama"


def test_llama_folder_loads_with_context_limit(llama_folder):
    lm, folder = llama_folder
    model = load_model(str(folder), device="cpu")
    assert model.family == "transformer" and model.max_length == 128 and model.state_floats_per_layer() == 0
    assert model.info["kv_cache_floats_per_token_per_layer"] == 2 * 2 * 16
    x = torch.randint(0, 4096, (1, 40))
    with torch.no_grad():
        assert torch.equal(model.lm(input_ids=x).logits, lm(input_ids=x).logits)
    long_text = "word " * 200
    with pytest.raises(ContextTooLongError, match=r"exceeds the model's context limit of 128.*allow_longer_context"):
        model.loglikelihood([(long_text, " end")])
    with pytest.raises(ContextTooLongError):
        model.generate(["hello"], max_new_tokens=200)
    opted_in = load_model(str(folder), device="cpu", allow_longer_context=True)
    (lp, _), = opted_in.loglikelihood([(long_text, " end")])
    assert lp < 0


def test_llama_segmented_scoring_and_generation_carry_the_cache(llama_folder):
    lm, folder = llama_folder
    model = load_model(f"transformer={folder}", device="cpu")
    tokens = list(range(3, 103))
    whole, _ = model.token_logprobs(tokens, segment=4096)
    pieces, _ = model.token_logprobs(tokens, segment=9)
    assert torch.allclose(whole, pieces, atol=1e-4)
    prompt = [5, 17, 99, 4000, 12]
    ours = model.generate_ids(prompt, max_new_tokens=12)
    theirs = lm.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs[:len(ours)] and len(ours) > 0


def test_tied_llama_without_lm_head_tensor_loads(tmp_path):
    torch.manual_seed(0)
    config = {**LLAMA, "tie_word_embeddings": True}
    lm = build_llama(config).eval()
    state = {k: v for k, v in lm.state_dict().items() if k != "lm_head.weight"}
    folder = write_checkpoint_folder(tmp_path / "tied", config, state, BPE_4K)
    model = load_model(str(folder), device="cpu")
    x = torch.randint(0, 4096, (1, 20))
    with torch.no_grad():
        assert torch.allclose(model.lm(input_ids=x).logits, lm(input_ids=x).logits)


def test_reference_rebuild_matches_transformers():
    up, ref = get_family("transformer").conformance_models(torch.device("cpu"))
    x = torch.randint(0, 512, (1, 70))
    with torch.no_grad():
        a, b = up(input_ids=x).logits, ref(x).logits
    assert ((a - b).norm() / a.norm()) < 1e-5


def test_non_llama_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="model_type='gpt2' is not a Llama-style model"):
        build_llama({**LLAMA, "model_type": "gpt2"})
