"""RULER adapter: what the model is fed (RULER's HF wrapper encodes the prompt with the tokenizer's default special
tokens: a BOS for Llama-style tokenizers, nothing for GPT-NeoX-style ones)."""
from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

from harness.bundled import BPE_4K
from harness.model import EvalModel
from harness.task_adapters import resolve_task


class RecordingModel(EvalModel):
    """An EvalModel whose generation records the prompt ids and answers with a fixed continuation."""

    def __init__(self, tokenizer, answer: str):
        super().__init__(name="stub", family="stub", lm=None, tokenizer=tokenizer, device="cpu", dtype=None,
                         source="stub", backend="stub", state_floats=0)
        self.answer, self.fed = answer, []

    def generate_ids(self, prompt_ids, max_new_tokens, stop_ids=(), segment=None, stop_when=None):
        self.fed.append(list(prompt_ids))
        return self.encode(self.answer)


def tokenizer_with_bos(add_bos: bool) -> PreTrainedTokenizerFast:
    raw = Tokenizer.from_file(str(BPE_4K / "tokenizer.json"))
    if add_bos:
        raw.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                           special_tokens=[("<|endoftext|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def test_prompt_gets_the_tokenizers_default_bos_like_rulers_hf_wrapper():
    task = resolve_task("niah_single_1")
    for add_bos in (True, False):
        model = RecordingModel(tokenizer_with_bos(add_bos), answer="")
        (sample,) = task.samples(model, 1024, 1, seed=0)
        model.answer = " " + sample.payload["outputs"][0] + "."
        result = task.evaluate(model, sample)
        prompt = sample.payload["input"] + sample.payload["answer_prefix"]
        plain = model.encode(prompt)
        assert model.fed[-1] == ([0] + plain if add_bos else plain)
        assert result.score == 100.0
        assert sample.payload["length"] <= 1024      # the window is counted without special tokens (RULER)
