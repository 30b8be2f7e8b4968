"""The compare job's scores: SQuAD's exact match and F1 of each answer, gold-document recall of the cited
passages, latency percentiles, and a few examples for the report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from jobs.compare_questions import QA
from jobs.compare_results import Example, Latency, SplitScore
from sharding.metrics import exact_match, token_f1


@dataclass
class Answer:
    """A system's answer to one question, as the serving app gave it."""

    id: str  # the question's
    text: str
    seconds: float  # the request's latency
    citations: list[str | None] = field(default_factory=list)  # doc ids of the passages in the prompt, in rank order
    error: str | None = None  # why the request failed (the answer is then empty)


def score(qas: Sequence[QA], answers: Sequence[Answer], k: int | None) -> SplitScore:
    """EM and F1 (SQuAD), gold-document recall@k of the cited passages (when ``k``), latency p50/p95."""
    by_id = {a.id: a for a in answers}
    em = [exact_match(by_id[q.id].text, q.answers) for q in qas]
    f1 = [token_f1(by_id[q.id].text, q.answers) for q in qas]
    lat = sorted(by_id[q.id].seconds for q in qas)
    gold = [q for q in qas if q.doc_id is not None]
    recall = _mean([float(q.doc_id in by_id[q.id].citations[:k]) for q in gold]) if k is not None and gold else None
    return SplitScore(n=len(qas), em=_mean(em), f1=_mean(f1), errors=sum(1 for q in qas if by_id[q.id].error),
                      latency_p50_s=percentile(lat, 50), latency_p95_s=percentile(lat, 95), recall_at_k=recall)


def latency(answers: Sequence[Answer]) -> Latency:
    """p50 and p95 of the answers' latencies."""
    lat = sorted(a.seconds for a in answers)
    return Latency(p50_s=percentile(lat, 50), p95_s=percentile(lat, 95))


def percentile(sorted_xs: Sequence[float], p: float) -> float | None:
    """The ``p``-th percentile of sorted values, nearest rank; None for no values."""
    if not sorted_xs:
        return None
    i = min(len(sorted_xs) - 1, max(0, round(p / 100 * (len(sorted_xs) - 1))))
    return float(sorted_xs[i])


def examples(qas: Sequence[QA], answers: Sequence[Answer], n: int = 3) -> list[Example]:
    """The first ``n`` questions with their reference answers and what the system said."""
    by_id = {a.id: a for a in answers}
    return [Example(question=q.question, answers=list(q.answers), said=by_id[q.id].text) for q in qas[:n]]


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0
