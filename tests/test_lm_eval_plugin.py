"""The lm-eval plugin (harness/lm_eval_plugin.py) against direct computations on the bundled tiny model."""
import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from harness.lm_eval_plugin import HarnessLM
from harness.registry import load_model

TEXT = ("Who's there? Nay, answer me: stand, and unfold yourself. Long live the king! "
        "You come most carefully upon your hour. 'Tis now struck twelve; get thee to bed.")


@pytest.fixture(scope="module")
def model():
    return load_model("gdn2-tiny-random", device="cpu", dtype="float32")


def _instances(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


def _full_logprobs(model, ids):
    """Independent oracle: one full forward over all ids (no cache, no segments), log_softmax over the vocab."""
    with torch.no_grad():
        logits = model.lm(input_ids=torch.tensor([ids])).logits[0].double()
    return F.log_softmax(logits, dim=-1)


class _LmEvalEncoder:
    """What lm-eval's TemplateLM._encode_pair reads from its LM: a causal backend and tok_encode (no special tokens,
    as HFLM encodes for causal models)."""

    backend = "causal"

    def __init__(self, model):
        self.tok_encode = lambda text: model.tokenizer.encode(text, add_special_tokens=False)


def _direct_loglikelihood(model, context, continuation):
    """Oracle: lm-eval's own _encode_pair for the split (empty context -> prefix token, as lm-eval's loglikelihood
    does), then one full forward."""
    from lm_eval.api.model import TemplateLM

    if context:
        context_ids, continuation_ids = TemplateLM._encode_pair(_LmEvalEncoder(model), context, continuation)
    else:
        context_ids, continuation_ids = [model.tokenizer.eos_token_id], model.tokenizer.encode(
            continuation, add_special_tokens=False)
    whole, n_ctx = context_ids + continuation_ids, len(context_ids)
    lp = _full_logprobs(model, whole)
    targets = whole[n_ctx:]
    rows = lp[n_ctx - 1:len(whole) - 1]
    total = float(rows.gather(-1, torch.tensor(targets)[:, None]).sum())
    greedy = bool((rows.argmax(-1) == torch.tensor(targets)).all())
    return total, greedy


def test_loglikelihood_equals_direct_computation(model):
    requests = [("Who's there? Nay, answer me:", " stand"), ("Long live the ", "king!"), ("", "Hamlet"),
                (TEXT, " And so good night."),
                ("Who goes there?\n", "Nay, answer me"),      # trailing newline moves to the continuation
                ("Long live th", "e king!")]                   # context ids != the whole string's first ids
    whole, alone = model.encode("Long live the king!"), model.encode("Long live th")
    assert whole[:len(alone)] != alone
    got = HarnessLM(model=model).loglikelihood(_instances("loglikelihood", requests))
    for (context, continuation), (ll, greedy) in zip(requests, got, strict=False):
        want_ll, want_greedy = _direct_loglikelihood(model, context, continuation)
        assert ll == pytest.approx(want_ll, abs=1e-3, rel=1e-5)
        assert greedy == want_greedy


def test_continuation_merged_into_the_context_is_refused_by_name(model):
    # "Long live the king!" and "Long live the ki" encode to the same number of tokens: nothing left to score
    with pytest.raises(ValueError, match="adds no token"):
        model.loglikelihood([("Long live the ki", "ng!")])


def test_rolling_uses_lm_eval_disjoint_windows(model):
    lm = HarnessLM(model=model, max_length=10)
    ids = model.encode(TEXT)
    assert len(ids) > 3 * 10 and len(ids) % 10
    (got,) = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(TEXT,)]))
    # oracle: each window of 10 predicted tokens scored from a fresh state; the first conditioned on the prefix token,
    # later ones on what precedes them inside a 10-token input (one token; more for the last, partial window)
    want, eos = 0.0, model.tokenizer.eos_token_id
    for start in range(0, len(ids), 10):
        end = min(start + 10, len(ids))
        context = [eos] if start == 0 else ids[end - 10 - 1:start]
        window = context + ids[start:end]
        lp = _full_logprobs(model, window)
        n = len(context)
        want += float(lp[n - 1:-1].gather(-1, torch.tensor(window[n:])[:, None]).sum())
    assert got == pytest.approx(want, abs=1e-3, rel=1e-5)
    # whole-document pass with the state carried: a different (longer-context) number
    (carry,) = HarnessLM(model=model, rolling="carry").loglikelihood_rolling(_instances("loglikelihood_rolling",
                                                                                         [(TEXT,)]))
    assert carry == pytest.approx(model.loglikelihood_rolling([TEXT])[0], abs=1e-6)
    assert abs(carry - got) > 1e-3
    # a window longer than the text: windows and carry agree
    (one,) = HarnessLM(model=model, max_length=4096).loglikelihood_rolling(_instances("loglikelihood_rolling",
                                                                                       [(TEXT,)]))
    assert one == pytest.approx(carry, abs=1e-3, rel=1e-5)


def test_rolling_window_is_the_model_context_limit(model):
    """As HFLM: a model with a hard limit of N tokens gets windows that feed exactly N tokens (no refusal)."""
    import dataclasses

    limited = dataclasses.replace(model, max_length=10)
    lm = HarnessLM(model=limited)
    assert lm.max_length == 10
    (got,) = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(TEXT,)]))
    (want,) = HarnessLM(model=model, max_length=10).loglikelihood_rolling(_instances("loglikelihood_rolling",
                                                                                     [(TEXT,)]))
    assert got == want


def test_generate_until_greedy_stops_and_budget(model):
    lm = HarnessLM(model=model)
    prompt = "Who's there? Nay, answer me:"
    free = model.decode(model.generate_ids(model.encode(prompt), 12))
    (out,) = lm.generate_until(_instances("generate_until", [(prompt, {"until": [], "max_gen_toks": 12})]))
    assert out == free
    stop = free[3:5]
    (cut,) = lm.generate_until(_instances("generate_until", [(prompt, {"until": [stop], "max_gen_toks": 12})]))
    assert cut == free[:free.index(stop)]


def test_left_truncation_is_explicit_and_recorded(model):
    lm = HarnessLM(model=model, truncate_input_to=20)
    ids = model.encode(TEXT)
    (out,) = lm.generate_until(_instances("generate_until", [(TEXT, {"until": [], "max_gen_toks": 5})]))
    assert lm.truncations[TEXT] == (len(ids), 20)
    assert out == model.decode(model.generate_ids(ids[-20:], 5))


def test_registered_and_built_from_arg_string():
    from lm_eval.api.registry import get_model

    assert get_model("harness") is HarnessLM
    lm = HarnessLM.create_from_arg_string("spec=gdn2-tiny-random,device=cpu,dtype=float32", {"batch_size": 1})
    assert lm.model.name == "gdn2-tiny-random" and lm.max_length == 4096   # the model's training length


def test_share_prefixes_model_arg_switches_shared_contexts():
    """model_args share_prefixes=false turns the shared-context path off (EvalModel.share_prefixes); absent, the
    model's own setting stays; a value that is not a boolean is refused by name."""
    lm = HarnessLM.create_from_arg_string("spec=gdn2-tiny-random,device=cpu,dtype=float32,share_prefixes=false")
    assert lm.model.share_prefixes is False
    assert HarnessLM(model=lm.model).model.share_prefixes is False
    assert HarnessLM(model=lm.model, share_prefixes="true").model.share_prefixes is True
    with pytest.raises(ValueError, match="expected a boolean"):
        HarnessLM(model=lm.model, share_prefixes="sometimes")


def test_cli_substitutes_rendered_offline_folder(tmp_path):
    from harness.lm_eval_cli import TEMPLATE_DIR, rewrite_argv
    from harness.lm_eval_tasks import offline_include_path

    argv = rewrite_argv(["--model", "harness", "--include_path", str(TEMPLATE_DIR), "--tasks", "piqa_olmoeval"])
    assert argv[argv.index("--include_path") + 1] == str(offline_include_path())
