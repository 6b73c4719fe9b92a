"""Bad input gives a clear error naming what was wrong: missing or corrupt files, weights that do not match the
config, missing tokenizers, offline hub ids; and the weight-file layouts that must load (safetensors, sharded
safetensors, pytorch_model.bin) plus explicit tokenizer paths."""
from __future__ import annotations

import json

import pytest
import torch

from baselines.common import write_checkpoint_folder
from harness.bundled import BPE_4K
from harness.registry import get_family, load_model

KDA = dict(model_type="kda", hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=16, vocab_size=4096,
           intermediate_size=128, norm_eps=1e-5)


@pytest.fixture(scope="module")
def kda_state():
    torch.manual_seed(0)
    return get_family("kda").build_reference(KDA).state_dict()


def folder_with(tmp_path, state, config=KDA, tokenizer=BPE_4K, weights="model.safetensors"):
    return write_checkpoint_folder(tmp_path / "ckpt", config, state, tokenizer, weights=weights)


def test_missing_folder_and_file_instead_of_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(f"kda={tmp_path / 'nowhere'}", device="cpu")
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file; pass the checkpoint folder"):
        load_model(f"kda={tmp_path / 'weights.safetensors'}", device="cpu")


def test_offline_hub_id_says_how_to_pass_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:
        load_model("kda=some-org/kda-340M", device="cpu")
    message = str(err.value)
    assert "could not fetch hub id 'some-org/kda-340M'" in message and "HF_HUB_OFFLINE=1" in message
    assert "pass the local folder: family=DIR" in message


def test_missing_and_corrupt_config(tmp_path, kda_state):
    folder = folder_with(tmp_path, kda_state)
    (folder / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON .* corrupt or truncated"):
        load_model(f"kda={folder}", device="cpu")
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_model(f"kda={folder}", device="cpu")


def test_missing_and_corrupt_weights_name_the_file(tmp_path, kda_state):
    folder = folder_with(tmp_path, kda_state)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"weight file .*model.safetensors is corrupt or truncated"):
        load_model(f"kda={folder}", device="cpu")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights in .*expected one of model.safetensors"):
        load_model(f"kda={folder}", device="cpu")
    torch.save(kda_state, folder / "pytorch_model.bin")
    (folder / "pytorch_model.bin").write_bytes((folder / "pytorch_model.bin").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"pytorch_model.bin is corrupt or truncated"):
        load_model(f"kda={folder}", device="cpu")


def test_weights_that_do_not_match_the_config_name_the_tensors(tmp_path, kda_state):
    state = dict(kda_state)
    del state["model.layers.1.attn.A_log"]
    state["model.layers.0.attn.extra.weight"] = torch.zeros(2)
    state["model.layers.0.attn.q_proj.weight"] = torch.zeros(16, 64)
    folder = folder_with(tmp_path, state)
    with pytest.raises(ValueError) as err:
        load_model(f"kda={folder}", device="cpu")
    message = str(err.value)
    assert "missing: model.layers.1.attn.A_log" in message
    assert "unexpected: model.layers.0.attn.extra.weight" in message
    assert "model.layers.0.attn.q_proj.weight: checkpoint (16, 64) vs model (32, 64)" in message
    # a config that disagrees with the weights (heads) is caught the same way
    folder2 = write_checkpoint_folder(tmp_path / "other", {**KDA, "num_heads": 4}, kda_state, BPE_4K)
    with pytest.raises(ValueError, match="shape mismatch: .*A_log: checkpoint \\(2,\\) vs model \\(4,\\)"):
        load_model(str(folder2), device="cpu")


def test_bin_and_sharded_layouts_load(tmp_path, kda_state):
    folder = folder_with(tmp_path, kda_state, weights="pytorch_model.bin")
    assert load_model(f"kda={folder}", device="cpu").num_params() > 0
    from safetensors.torch import save_file

    sharded = tmp_path / "sharded"
    write_checkpoint_folder(sharded, KDA, {}, BPE_4K)
    (sharded / "model.safetensors").unlink()
    names = sorted(kda_state)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in halves.items():
        save_file({k: kda_state[k].contiguous() for k in keys}, str(sharded / file))
    index = {"weight_map": {k: f for f, keys in halves.items() for k in keys}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    model = load_model(str(sharded), device="cpu")
    assert torch.equal(model.lm.state_dict()["model.norm.weight"], kda_state["model.norm.weight"])
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors is missing"):
        load_model(str(sharded), device="cpu")


def test_tokenizer_from_folder_explicit_path_or_clear_error(tmp_path, kda_state):
    folder = folder_with(tmp_path, kda_state, tokenizer=None)
    with pytest.raises(FileNotFoundError, match=r"no tokenizer files .* pass one with --tokenizer PATH"):
        load_model(f"kda={folder}", device="cpu")
    model = load_model(f"kda={folder}", device="cpu", tokenizer=str(BPE_4K / "tokenizer.json"))
    assert model.encode("hello world")
    model = load_model(f"kda={folder}", device="cpu", tokenizer=str(BPE_4K))
    assert model.decode(model.encode("hello world")) == "hello world"
    with pytest.raises(FileNotFoundError, match="tokenizer path .*missing-tok does not exist"):
        load_model(f"kda={folder}", device="cpu", tokenizer=str(tmp_path / "missing-tok"))


def test_recurrent_families_have_no_hard_context_limit(tmp_path, kda_state):
    model = load_model(f"kda={folder_with(tmp_path, kda_state)}", device="cpu")
    assert model.max_length is None and model.trained_length == 2048  # fla's default max_position_embeddings


def test_bundled_tokenizer_loads_without_a_model_type_warning():
    """A folder whose config.json has a model_type transformers does not know (gdn2) and whose tokenizer_config
    names PreTrainedTokenizerFast: the tokenizer equals AutoTokenizer's, and no "model of type" warning is logged
    (AutoTokenizer logs one, having read config.json)."""
    import logging

    from transformers import AutoTokenizer

    from harness.checkpoint import load_tokenizer

    folder = BPE_4K.parent / "gdn2-small"
    assert json.loads((folder / "config.json").read_text())["model_type"] == "gdn2"
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logging.getLogger("transformers").addHandler(handler)
    try:
        ours = load_tokenizer(folder, None)
        assert not [m for m in messages if "model of type" in m]
        reference = AutoTokenizer.from_pretrained(str(folder))
        assert [m for m in messages if "model of type" in m], "AutoTokenizer no longer warns: the check above is moot"
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    text = "The special magic number for sleepy-cabbage is: 4821937."
    assert type(ours) is type(reference)
    assert ours(text)["input_ids"] == reference(text)["input_ids"]
    assert (ours.bos_token, ours.eos_token) == (reference.bos_token, reference.eos_token)
