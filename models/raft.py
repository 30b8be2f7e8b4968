"""Training records as chat: closed-book question/answer pairs, the corpus as text, and RAFT's records (a question
with retrieved passages in the serving prompt), plus replay records mixed in.

RAFT (Zhang et al. 2024) trains a model to answer from the passages retrieval gives it, so its records are built
with the serving app's own prompt (``models.prompt``: ``rag_messages``, and ``build_prompt`` to cut the passages
to the training length the way the app cuts them to the model's context): what is trained is what is served.
Pure functions of questions, passages and configs; the compare job retrieves the passages and runs the
fine-tuning.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypedDict

from configs.errors import InvalidRequest, RagtuneError
from configs.schema.compare import RaftConfig
from configs.schema.serve import PromptConfig
from models.generators import load_tokenizer
from models.prompt import build_prompt, rag_messages


class Question(Protocol):
    """A question with its reference answers and, when known, the id of the document that answers it."""

    @property
    def id(self) -> str: ...

    @property
    def question(self) -> str: ...

    @property
    def answers(self) -> Sequence[str]: ...

    @property
    def doc_id(self) -> str | None: ...


class ChatRecord(TypedDict):
    """A training record as the finetune job reads it (``models.sft.to_messages``)."""

    id: str
    messages: list[dict[str, str]]


class RaftInfo(TypedDict):
    gold: bool  # whether the gold passage is in the prompt (after fitting)
    distractors: list[str | None]  # doc ids of the other passages in the prompt


class RaftRecord(ChatRecord):
    raft: RaftInfo


def qa_records(qas: Sequence[Question]) -> list[ChatRecord]:
    """Closed-book chat records: the question as the user turn, the first reference answer as the assistant's."""
    return [{"id": q.id, "messages": [{"role": "user", "content": q.question},
                                      {"role": "assistant", "content": q.answers[0]}]} for q in qas]


def corpus_records(docs: Sequence[Mapping[str, Any]]) -> list[ChatRecord]:
    """The corpus as chat records (the title asked, the text answered): the loss falls on the document text."""
    return [{"id": f"doc:{d['id']}", "messages": [{"role": "user", "content": str(d.get("title") or d["id"])},
                                                  {"role": "assistant", "content": str(d["text"])}]}
            for d in docs if d.get("text")]


PassageFit = Callable[[str, list[dict[str, Any]], str], list[dict[str, Any]]]


def raft_records(qas: Sequence[Question], retrieved: Mapping[str, Sequence[Mapping[str, Any]]],
                 gold: Mapping[str, Mapping[str, Any] | None], cfg: RaftConfig, prompt: PromptConfig,
                 seed: int, k: int, fit: PassageFit | None = None) -> list[RaftRecord]:
    """RAFT records: a question, ``k`` passages as retrieval would give them, its answer, in the serving app's own
    prompt.

    In ``cfg.gold_fraction`` of the records the passages are the gold one and ``k - 1`` hard distractors (or
    ``cfg.distractors``); in the others only distractors, one more: there the answer must come from what the
    model learned, not from the prompt (the paper's P% / (1 - P)% split).

    Args:
        qas: the seen questions.
        retrieved: per question id, passages retrieved from the real index, best first (``doc_id``, ``title``,
            ``text``); the hard distractors are the best of these from other documents.
        gold: per question id, the gold passage (a chunk of its ``doc_id``), or None when it is not indexed.
        cfg: ``gold_fraction`` and ``distractors``.
        prompt: the serving app's prompt config (passages numbered, system message, question).
        seed: the gold draw and the passages' order.
        k: the passages retrieval puts into a prompt (``retrieval.k``).
        fit: cuts a record's passages to what fits the training length, as the serving app cuts them to the
            model's context (:func:`passage_fit`); None keeps them whole.

    Returns:
        Chat records; ``raft`` says whether the gold passage is in it (after fitting) and which distractors are.
    """
    n = cfg.distractors if cfg.distractors is not None else k - 1
    rng = random.Random(seed)
    out: list[RaftRecord] = []
    for q in qas:
        g = gold.get(q.id)
        with_gold = g is not None and rng.random() < cfg.gold_fraction
        others = [p for p in retrieved.get(q.id, ()) if p.get("doc_id") != q.doc_id]
        distractors = others[:n if with_gold else n + 1]
        passages = [dict(p) for p in distractors] + ([dict(g)] if with_gold and g is not None else [])
        rng.shuffle(passages)
        if fit is not None:
            passages = fit(q.question, passages, q.answers[0])
        messages = rag_messages([{"role": "user", "content": q.question}], passages, prompt)
        kept = {p.get("doc_id") for p in passages}
        out.append({"id": q.id, "messages": [*messages, {"role": "assistant", "content": q.answers[0]}],
                    "raft": {"gold": with_gold and q.doc_id in kept,
                             "distractors": [p.get("doc_id") for p in distractors if p.get("doc_id") in kept]}})
    return out


def passage_fit(base: str, prompt: PromptConfig, max_length: int) -> PassageFit:
    """Fit a RAFT record's passages into ``max_length`` tokens (``finetune.max_length``) with the serving app's
    own rule (:func:`models.prompt.build_prompt`: the last passage is cut by tokens, or dropped when too little of
    it would remain), leaving room for the answer, so that no record loses its answer to truncation."""
    tok = load_tokenizer(base)

    def fit(question: str, passages: list[dict[str, Any]], answer: str) -> list[dict[str, Any]]:
        room = len(tok(answer, add_special_tokens=False)["input_ids"]) + 8  # the answer, the template's end
        try:
            p = build_prompt(tok, [{"role": "user", "content": question}], passages, prompt, max_length, room)
        except InvalidRequest:
            raise RagtuneError(f"finetune.max_length = {max_length}: the question {question[:60]!r} and its answer "
                               "do not fit even without passages. Fix: raise finetune.max_length") from None
        return [{k: v for k, v in x.items() if k != "n"} for x in p.passages]

    return fit


def replay_records(path: str, n: int, seed: int) -> list[ChatRecord]:
    """``n`` records of a JSONL file of chat records, a seeded sample (all of them when there are fewer)."""
    p = Path(path)
    if not p.is_file():
        raise RagtuneError(f"raft.replay = {path!r}: no such file. Fix: give a JSONL file of chat records "
                           "(`messages`), or null")
    rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(seed)
    picked = rows if len(rows) <= n else [rows[i] for i in sorted(rng.sample(range(len(rows)), n))]
    return [{"id": f"replay:{r.get('id', i)}", "messages": r["messages"]} for i, r in enumerate(picked)]
