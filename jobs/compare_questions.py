"""The compare job's questions: read from JSONL, split into seen and held-out by gold document, sampled."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from configs.errors import RagtuneError
from models.sft import is_validation


@dataclass(frozen=True)
class QA:
    """A question with its reference answers and, when known, the id of the document that answers it."""

    id: str
    question: str
    answers: tuple[str, ...]
    doc_id: str | None = None


def read_questions(path: str, where: str = "questions.path") -> list[QA]:
    """Questions from JSONL: ``question``, ``answers`` (a list, or one string), optional ``doc_id`` (or SQuAD's
    ``paragraph_id``) and ``id``. Every problem is named with its line."""
    p = Path(path)
    if not p.is_file():
        raise RagtuneError(f"{where} = {path!r}: no such file. Fix: give a JSONL file of {{question, answers[], "
                           "doc_id}} records")
    out: list[QA] = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            raise RagtuneError(f"{path}:{n}: not JSON. Fix: one JSON object per line") from None
        answers = r.get("answers")
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(r.get("question"), str) or not answers or not all(isinstance(a, str) for a in answers):
            raise RagtuneError(f"{path}:{n}: needs `question` (text) and `answers` (a non-empty list of texts); "
                               f"fields: {', '.join(r)}. Fix: write e.g. "
                               '{"question": "...", "answers": ["..."], "doc_id": "..."}')
        doc = r.get("doc_id", r.get("paragraph_id"))
        out.append(QA(str(r.get("id", f"q{n}")), r["question"].strip(), tuple(answers),
                      None if doc is None else str(doc)))
    if not out:
        raise RagtuneError(f"{where} = {path!r} holds no questions. Fix: give at least one record")
    ids = [q.id for q in out]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise RagtuneError(f"{path}: question id {dup!r} appears twice. Fix: give every question its own id")
    return out


def split_questions(qas: Sequence[QA], finetune_fraction: float, seed: int) -> tuple[list[QA], list[QA]]:
    """(seen, held-out): whole gold documents go to one side (a stable hash of the doc id, else of the question
    id), so a held-out question's fact is never in the fine-tuning data through another question."""
    seen: list[QA] = []
    held: list[QA] = []
    for q in qas:
        (held if is_validation(q.doc_id or q.id, 1 - finetune_fraction, seed) else seen).append(q)
    return seen, held


def sample(qas: Sequence[QA], n: int | None, seed: int) -> list[QA]:
    """At most ``n`` questions, a seeded sample in file order."""
    if n is None or len(qas) <= n:
        return list(qas)
    keep = set(random.Random(seed).sample(range(len(qas)), n))
    return [q for i, q in enumerate(qas) if i in keep]
