"""Evaluation metrics: retrieval in the BEIR format (queries.jsonl, qrels TSV, recall@k, nDCG@10, MRR@10), and
answers as SQuAD scores them (exact match and token F1 after its normalisation).

Definitions follow BEIR (``EvaluateRetrieval.evaluate`` over pytrec_eval, and its ``mrr``):

- recall@k: relevant documents in the top k / relevant documents of the query (qrels score > 0);
- nDCG@k: DCG with gain = the qrels score and discount log2(rank + 1), divided by the DCG of the ideal ranking
  of the query's judged documents;
- MRR@k: 1 / rank of the first relevant document in the top k, 0 if none;

each averaged over the queries that have qrels (a query without results scores 0). Documents are ranked by the
score of their best chunk.

Answers follow the official SQuAD v1.1 evaluation script (``evaluate-v1.1.py``): both sides lower-cased, with
punctuation, the articles a/an/the and extra white space removed; exact match is equality after that, F1 the
harmonic mean of token precision and recall; each is the maximum over the reference answers.
"""

from __future__ import annotations

import csv
import json
import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from configs.errors import RagtuneError

Qrels = dict[str, dict[str, int]]


def read_queries(path: str | Path) -> dict[str, str]:
    """BEIR queries.jsonl: one ``{"_id": ..., "text": ...}`` per line -> {query id: text}."""
    out: dict[str, str] = {}
    p = Path(path)
    if not p.is_file():
        raise RagtuneError(f"{path}: no such queries file. Fix: give a BEIR queries.jsonl (_id, text per line)")
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                out[str(rec["_id"])] = rec["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise RagtuneError(f"{path}:{n}: not a BEIR query line (needs _id and text). Fix: write one JSON "
                                   'object per line, e.g. {"_id": "q1", "text": "who ..."}') from None
    return out


def read_query_texts(path: str | Path) -> list[str]:
    """Query texts from a BEIR queries.jsonl (``.jsonl``/``.json``) or a text file with one query per line."""
    p = Path(path)
    if p.suffix in (".jsonl", ".json"):
        return list(read_queries(p).values())
    if not p.is_file():
        raise RagtuneError(f"{path}: no such file. Fix: give a BEIR queries.jsonl or a text file, one query a line")
    return [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_qrels(path: str | Path) -> Qrels:
    """BEIR qrels TSV (``query-id  corpus-id  score`` with a header line) -> {query id: {doc id: score}}."""
    p = Path(path)
    if not p.is_file():
        raise RagtuneError(f"--qrels {path}: no such file. Fix: give a BEIR qrels TSV (query-id, corpus-id, score)")
    out: Qrels = {}
    with p.open(encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not row or (n == 1 and row[0] == "query-id"):
                continue
            try:
                qid, did, score = row[0], row[1], int(float(row[2]))
            except (IndexError, ValueError):
                raise RagtuneError(f"{path}:{n}: not a qrels line {row!r}. Fix: query-id<TAB>corpus-id<TAB>score") \
                    from None
            out.setdefault(qid, {})[did] = score
    return out


def rank_documents(scores: np.ndarray, chunk_ids: np.ndarray, doc_of: Mapping[int, str], metric: str,
                   k: int) -> list[tuple[str, float]]:
    """One query's chunk results -> its top-k documents, each scored by its best chunk.

    Args:
        scores: (n,) distances in result order (best first).
        chunk_ids: (n,) chunk ids; -1 = no result.
        doc_of: chunk id -> document id.
        metric: inner_product (higher is better) or l2 (lower is better; the score reported is -distance).
        k: documents to keep.
    """
    seen: dict[str, float] = {}
    for s, c in zip(scores.tolist(), chunk_ids.tolist(), strict=True):
        if c < 0:
            continue
        doc = doc_of[c]
        if doc not in seen:  # results come best first: the first chunk of a document is its best
            seen[doc] = s if metric == "inner_product" else -s
            if len(seen) == k:
                break
    return list(seen.items())


_CONTENT_ID = re.compile(r"^h[0-9a-f]{16}$")  # sharding.ids.doc_id_from_content


def judged_in_index(qrels: Qrels, in_index: set[str], index_uri: str = "this index") -> float:
    """The share of the qrels' relevant documents that the index holds (1.0: all).

    None of them held: the metrics would be 0 whatever the retrieval does, so it is a RagtuneError that says
    why, e.g. ids made from the content because the embed job's ``corpus.id_field`` named no field.
    """
    judged = {d for r in qrels.values() for d, s in r.items() if s > 0}
    if not judged:
        return 1.0
    found = len(judged & in_index)
    if found == 0:
        sample = sorted(in_index)[:3]
        hashed = bool(in_index) and sum(bool(_CONTENT_ID.match(d)) for d in in_index) >= 0.9 * len(in_index)
        why = ("its document ids look like content hashes (" + ", ".join(sample) + "): the embed job found no "
               "id field. Fix: embed the corpus again with corpus.id_field set to the field the qrels use "
               "(BEIR: corpus.id_field=_id)") if hashed else (
               f"its document ids look like {', '.join(sample)} and the qrels' like "
               f"{', '.join(sorted(judged)[:3])}. Fix: pass the qrels of the corpus this index was built from, or "
               "embed with the id field the qrels use (corpus.id_field)")
        raise RagtuneError(f"none of the {len(judged):,} documents judged relevant in the qrels is in {index_uri}: "
                           "every metric would be 0 whatever the retrieval does; " + why)
    return found / len(judged)


def evaluate(run: Mapping[str, Sequence[str]], qrels: Qrels, ks: Iterable[int] = (1, 5, 10, 100),
             ndcg_k: int = 10, mrr_k: int = 10) -> dict[str, float]:
    """BEIR metrics of a run ({query id: ranked document ids}) against qrels.

    Returns:
        {"ndcg@10", "mrr@10", "recall@1", ..., "queries"}: means over the queries with qrels.
    """
    ks = sorted(set(ks))
    totals = {f"recall@{k}": 0.0 for k in ks}
    totals.update({f"ndcg@{ndcg_k}": 0.0, f"mrr@{mrr_k}": 0.0})
    n = 0
    for qid, judged in qrels.items():
        relevant = {d for d, s in judged.items() if s > 0}
        if not relevant:
            continue
        n += 1
        ranked = list(run.get(qid, ()))
        for k in ks:
            totals[f"recall@{k}"] += len(relevant.intersection(ranked[:k])) / len(relevant)
        dcg = sum(judged.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:ndcg_k]))
        ideal = sorted((s for s in judged.values() if s > 0), reverse=True)[:ndcg_k]
        idcg = sum(s / math.log2(i + 2) for i, s in enumerate(ideal))
        totals[f"ndcg@{ndcg_k}"] += dcg / idcg if idcg > 0 else 0.0
        first = next((i for i, d in enumerate(ranked[:mrr_k]) if d in relevant), None)
        totals[f"mrr@{mrr_k}"] += 0.0 if first is None else 1.0 / (first + 1)
    if n == 0:
        raise RagtuneError("no query in the qrels has a relevant document (score > 0). Fix: check the qrels file")
    out = {name: value / n for name, value in totals.items()}
    out["queries"] = n
    return out


# --- answers (SQuAD) -------------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised reference answer, else 0.0."""
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(a) for a in answers))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """The best token F1 of the prediction against the reference answers (0.0 when nothing is shared)."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for a in answers:
        ref = normalize_answer(a).split()
        same = sum((Counter(pred) & Counter(ref)).values())
        if same:
            precision, recall = same / len(pred), same / len(ref)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best
