"""BEIR retrieval metrics on cases small enough to check by hand."""

import math

import numpy as np
import pytest

from configs.errors import RagtuneError
from sharding.metrics import (
    evaluate,
    exact_match,
    judged_in_index,
    normalize_answer,
    rank_documents,
    read_qrels,
    read_queries,
    token_f1,
)


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


# --- answers (SQuAD's exact match and F1) ---------------------------------------------------------------------------

SUPER_BOWL_VENUE = ["Santa Clara, California", "Levi's Stadium",
                    "Levi's Stadium in the San Francisco Bay Area at Santa Clara, California."]  # SQuAD v1.1 dev


def test_normalisation_as_the_squad_script_does_it():
    assert normalize_answer("The Denver Broncos!") == "denver broncos"
    assert normalize_answer('"golden  anniversary"') == "golden anniversary"
    assert normalize_answer("an apple a day, the theory") == "apple day theory"
    assert normalize_answer("Levi's") == "levis"  # punctuation goes, the letters stay joined
    assert normalize_answer("Theory of a thing") == "theory of thing"  # articles only as whole words


def test_exact_match_is_the_best_over_the_references():
    assert exact_match("the Denver Broncos.", ["Denver Broncos"]) == 1.0
    assert exact_match("Levi's stadium", SUPER_BOWL_VENUE) == 1.0
    assert exact_match("Santa Clara", SUPER_BOWL_VENUE) == 0.0
    assert exact_match("", ["gold"]) == 0.0


def test_token_f1_by_hand():
    # vs "santa clara california": precision 2/2, recall 2/3 -> 0.8 (the best of the three references)
    assert token_f1("Santa Clara", SUPER_BOWL_VENUE) == pytest.approx(0.8)
    # vs "levis stadium in san francisco bay area at santa clara california" (11 tokens): 2 shared
    assert token_f1("Santa Clara", SUPER_BOWL_VENUE[2:]) == pytest.approx(2 * (2 / 11) / (1 + 2 / 11))
    assert token_f1("Denver Broncos", ["Denver Broncos"]) == 1.0
    assert token_f1("gold gold", ["gold"]) == pytest.approx(2 * 0.5 * 1 / 1.5)  # a repeated token counts once
    assert token_f1("the", ["a"]) == 0.0 and token_f1("", ["gold"]) == 0.0


def test_squad_second_answer_against_the_others(squad_retrieval):
    """The second reference answer of each SQuAD v1.1 dev question scored against the others (the way the SQuAD
    paper estimates human agreement): a regression pin over every quirk of real answers (punctuation, articles,
    numbers, unicode), values as this implementation first measured them."""
    import json

    em = f1 = n = 0.0
    for line in (squad_retrieval / "qa.jsonl").read_text().splitlines():
        a = json.loads(line)["answers"]
        if len(a) >= 2:
            em += exact_match(a[1], a[:1] + a[2:])
            f1 += token_f1(a[1], a[:1] + a[2:])
            n += 1
    assert n == 10567
    assert (round(em / n, 4), round(f1 / n, 4)) == (0.8153, 0.9104)


def test_qrels_whose_documents_are_not_in_the_index_are_said_not_scored_as_zero():
    qrels = {"q1": {"sq00p000": 1, "sq00p001": 0}, "q2": {"sq00p002": 2}}
    assert judged_in_index(qrels, {"sq00p000", "sq00p002", "other"}) == 1.0
    assert judged_in_index(qrels, {"sq00p000"}) == 0.5  # sq00p001 is not judged relevant (score 0)
    hashed = {"h0123456789abcdef", "hfedcba9876543210"}  # a BEIR corpus embedded without corpus.id_field=_id
    with pytest.raises(RagtuneError) as e:
        judged_in_index(qrels, hashed, "/runs/index")
    assert "none of the 2 documents judged relevant in the qrels is in /runs/index" in e.value.message
    assert "look like content hashes" in e.value.message and "corpus.id_field=_id" in e.value.message
    with pytest.raises(RagtuneError, match="ids look like d1, d2 and the qrels' like sq00p000, sq00p002"):
        judged_in_index(qrels, {"d1", "d2"})
