"""BEIR retrieval metrics on cases small enough to check by hand."""

import math

import numpy as np
import pytest

from configs.schema.base import RagtuneError
from sharding.metrics import evaluate, rank_documents, read_qrels, read_queries


def test_metrics_by_hand():
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1, "d3": 2}, "q3": {"d9": 1}}
    run = {"q1": ["d5", "d1"], "q2": ["d3", "d4", "d2"], "q3": ["d1"]}
    m = evaluate(run, qrels, ks=(1, 2, 5))
    assert m["queries"] == 3
    assert m["recall@1"] == pytest.approx((0 + 0.5 + 0) / 3)
    assert m["recall@2"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["recall@5"] == pytest.approx((1 + 1 + 0) / 3)
    assert m["mrr@10"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    ndcg_q1 = (1 / math.log2(3)) / 1
    ndcg_q2 = (2 + 1 / math.log2(4)) / (2 + 1 / math.log2(3))  # graded gains, ideal order d3, d2
    assert m["ndcg@10"] == pytest.approx((ndcg_q1 + ndcg_q2 + 0) / 3)


def test_queries_without_results_count_as_zero_and_unjudged_queries_are_ignored():
    m = evaluate({"q1": ["d1"]}, {"q1": {"d1": 1}, "q2": {"d2": 1}, "q3": {"d3": 0}}, ks=(1,))
    assert m["queries"] == 2 and m["recall@1"] == 0.5 and m["ndcg@10"] == 0.5
    with pytest.raises(RagtuneError, match="no query in the qrels has a relevant document"):
        evaluate({}, {"q": {"d": 0}})


def test_documents_are_ranked_by_their_best_chunk():
    doc_of = {1: "a", 2: "b", 3: "a", 4: "c"}
    ranked = rank_documents(np.array([0.9, 0.8, 0.7, 0.1, -3e38]), np.array([3, 2, 1, 4, -1]), doc_of,
                            "inner_product", 10)
    assert ranked == [("a", pytest.approx(0.9)), ("b", pytest.approx(0.8)), ("c", pytest.approx(0.1))]
    assert [d for d, _ in rank_documents(np.array([0.1, 0.2]), np.array([4, 2]), doc_of, "l2", 1)] == ["c"]


def test_beir_files(tmp_path):
    (tmp_path / "q.jsonl").write_text('{"_id": "q1", "text": "who?"}\n\n{"_id": 2, "text": "what?"}\n')
    (tmp_path / "r.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n2\td2\t2\n")
    assert read_queries(tmp_path / "q.jsonl") == {"q1": "who?", "2": "what?"}
    assert read_qrels(tmp_path / "r.tsv") == {"q1": {"d1": 1}, "2": {"d2": 2}}
    (tmp_path / "bad.jsonl").write_text('{"text": "no id"}\n')
    with pytest.raises(RagtuneError, match=r"bad.jsonl:1: not a BEIR query line"):
        read_queries(tmp_path / "bad.jsonl")
    with pytest.raises(RagtuneError, match=r"--qrels .*missing.tsv: no such file"):
        read_qrels(tmp_path / "missing.tsv")
