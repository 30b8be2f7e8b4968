"""The compare job's pure parts: questions and splits, training records (RAFT's gold fraction and distractors), the
scores and the table; and the demo's reading records and claims."""

import base64
import json
import re

import pytest

from configs.errors import RagtuneError
from configs.schema.compare import CompareJobConfig, RaftConfig
from configs.schema.serve import PromptConfig
from jobs.compare_questions import QA, read_questions, sample, split_questions
from jobs.compare_report import render_table
from jobs.compare_results import SystemResult
from jobs.compare_scoring import Answer, score
from models.raft import passage_fit, qa_records, raft_records


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def typed(results):
    """The systems of a results dict as the typed results the report and the claims read."""
    return {name: SystemResult.model_validate(s) for name, s in results["systems"].items()}


def qas(n, docs=None):
    return [QA(f"q{i}", f"What is fact {i}?", (f"answer {i}", f"ans {i}"), f"d{i % (docs or n)}") for i in range(n)]


def test_questions_are_read_with_their_gold_documents_and_bad_lines_named(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [
        {"id": "a", "question": "Who? ", "answers": ["Ana"], "doc_id": "d1"},
        {"question": "Where?", "answers": "Ophir", "paragraph_id": "sq00p001"},  # SQuAD's qa.jsonl field
    ])
    got = read_questions(path)
    assert got == [QA("a", "Who?", ("Ana",), "d1"), QA("q2", "Where?", ("Ophir",), "sq00p001")]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "x", "answers": []}])
    with pytest.raises(RagtuneError, match=r"bad.jsonl:1: needs `question` \(text\) and `answers`"):
        read_questions(bad)
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": "x", "question": "a", "answers": ["b"]}] * 2)
    with pytest.raises(RagtuneError, match="question id 'x' appears twice"):
        read_questions(dup)
    with pytest.raises(RagtuneError, match="questions.path = .*: no such file"):
        read_questions(str(tmp_path / "none.jsonl"))


def test_the_split_keeps_each_gold_document_on_one_side_and_is_stable():
    qs = qas(400, docs=50)
    seen, held = split_questions(qs, 0.5, seed=3)
    assert {q.doc_id for q in seen}.isdisjoint({q.doc_id for q in held})
    assert len(seen) + len(held) == 400 and 0.3 < len(seen) / 400 < 0.7
    assert split_questions(qs, 0.5, seed=3) == (seen, held)
    assert split_questions(qs, 0.5, seed=4) != (seen, held)
    assert len(sample(seen, 10, 0)) == 10 and sample(seen, 10, 0) == sample(seen, 10, 0)


def test_raft_records_hold_the_gold_passage_in_the_configured_fraction_and_never_a_gold_distractor():
    prompt = PromptConfig(system="")
    qs = qas(1000)
    retrieved = {q.id: [{"doc_id": q.doc_id, "title": "gold", "text": f"gold text {q.id}"},
                        *({"doc_id": f"other{j}", "title": f"o{j}", "text": f"distractor {j}"} for j in range(5))]
                 for q in qs}
    gold = {q.id: retrieved[q.id][0] for q in qs}
    records = raft_records(qs, retrieved, gold, RaftConfig(gold_fraction=0.7), prompt, seed=0, k=3)
    with_gold = [r for r in records if r["raft"]["gold"]]
    assert 0.65 < len(with_gold) / len(records) < 0.75
    for q, r in zip(qs, records, strict=True):
        # the best-ranked passages of other documents: beside the gold one k - 1, in its place one more
        assert r["raft"]["distractors"] == (["other0", "other1"] if r["raft"]["gold"] else ["other0", "other1",
                                                                                             "other2"])
        user, answer = r["messages"][-2]["content"], r["messages"][-1]
        assert answer == {"role": "assistant", "content": q.answers[0]}
        assert ("gold text" in user) == r["raft"]["gold"] and "distractor 0" in user and "distractor 3" not in user
        assert user.endswith(f"Question: {q.question}") and len(re.findall(r"^\[\d\] ", user, re.M)) == 3
    # the prompt is the serving app's: the same function renders it
    from models.prompt import rag_messages

    one = raft_records(qs[:40], retrieved, gold, RaftConfig(gold_fraction=0.5), prompt, seed=1, k=1)
    for q, r in zip(qs, one, strict=False):
        passage = retrieved[q.id][0] if r["raft"]["gold"] else {"title": "o0", "text": "distractor 0"}
        assert r["messages"][:-1] == rag_messages([{"role": "user", "content": q.question}], [passage], prompt)
    # an explicit distractor count; no gold indexed for a question: its records have distractors only
    two = raft_records(qs[:3], retrieved, gold, RaftConfig(gold_fraction=1.0, distractors=2), prompt, 0, k=1)
    assert all(len(r["raft"]["distractors"]) == 2 and r["raft"]["gold"] for r in two)
    none = raft_records(qs[:3], retrieved, {}, RaftConfig(gold_fraction=1.0), prompt, 0, k=2)
    assert not any(r["raft"]["gold"] for r in none) and all(len(r["raft"]["distractors"]) == 2 for r in none)


def test_qa_records_are_closed_book_chat():
    assert qa_records(qas(1)) == [{"id": "q0", "messages": [{"role": "user", "content": "What is fact 0?"},
                                                            {"role": "assistant", "content": "answer 0"}]}]


def test_scores_are_squad_em_f1_recall_of_the_cited_gold_and_latency():
    qs = qas(4)
    answers = [Answer("q0", "Answer 0.", 0.1, ["d0"]), Answer("q1", "ans 1 more", 0.2, ["x", "d1"]),
               Answer("q2", "nothing", 0.3, ["x"]), Answer("q3", "", 0.4, [], error="HTTP 500: boom")]
    s = score(qs, answers, k=2).model_dump()  # as results.json holds it
    assert s["n"] == 4 and s["em"] == 0.25 and s["errors"] == 1
    assert s["f1"] == pytest.approx((1 + 0.8 + 0 + 0) / 4)  # "ans 1 more" vs "ans 1": P 2/3, R 1
    assert s["recall_at_k"] == 0.5 and s["latency_p50_s"] in (0.2, 0.3) and s["latency_p95_s"] == 0.4
    assert "recall_at_k" not in score(qs, answers, k=None).model_dump()


def _split(em):
    return {"em": em, "f1": em, "n": 10, "recall_at_k": 0.9, "errors": 0, "latency_p50_s": 0.1, "latency_p95_s": 0.2}


def two_systems(split=_split):
    """A results dict of the base model and RAG, with an update."""
    return {"systems": {
        "base": {"seen": split(0.0), "held_out": split(0.0), "data_needed": "nothing", "cost_text": "-",
                 "maintenance": "none", "latency": {"p50_s": 0.1, "p95_s": 0.2}, "examples": [],
                 "update": {"before": split(0.0), "after": split(0.0)}},
        "rag": {"seen": split(0.9), "held_out": split(0.85), "data_needed": "the corpus", "cost_text": "30 s",
                "maintenance": "index add", "latency": {"p50_s": 0.3, "p95_s": 0.5}, "examples": [],
                "update": {"before": split(0.1), "after": split(0.9), "time_to_knowledge_s": 4.2,
                           "how": "index add + reload"}},
    }}


def test_the_table_has_a_row_per_system_and_the_columns_people_decide_with():
    results = two_systems()
    table = render_table(typed(results)).splitlines()
    assert table[0].startswith("| approach | data it needs | seen facts EM / F1 | held-out facts EM / F1 |")
    assert len(table) == 4 and table[2].startswith("| base model | nothing |")
    assert "never (closed-book, not retrained)" in table[2]
    assert "| RAG | the corpus | 90% / 0.90 | 85% / 0.85 | 90% (before: 10%) | 4.2 s (index add + reload) | " \
           "90% / 90% | 300 / 500 ms | 30 s | index add |" == table[3]


def test_the_terminal_table_fits_80_columns_and_the_page_is_self_contained():
    from jobs.compare_report import Claim, render_html, render_terminal
    from jobs.compare_results import CompareResults

    results = two_systems()
    term = render_terminal(typed(results)).splitlines()
    assert max(len(line) for line in term) <= 80 and len(term) == 4
    assert term[3].split() == ["RAG", "90%", "85%", "10%", "->", "90%", "4.2", "s", "300", "ms"]
    assert term[2].split()[-3:] == ["never", "100", "ms"]
    full = CompareResults.model_validate({
        **results, "config": {"model": {"name": "tiny <b>"}}, "seconds": 99.0,
        "questions": {"total": 40, "seen": 20, "held_out": 10, "update": 10},
        "stages": {"index": {"seconds": 3, "embed_s": 1, "index_s": 2, "docs": 5, "chunks": 9}}})
    chart = b"\x89PNG-not-really"
    page = render_html(full, chart, [Claim("RAG answers new facts", True, "10% -> 90%"),
                                     Claim("RAFT beats RAG", False, "80% vs 90%")])
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page
    assert f'src="data:image/png;base64,{base64.b64encode(chart).decode()}"' in page  # the chart inline
    assert page.count("<tr>") == 3 and "<td>4.2 s (index add + reload)</td>" in page
    assert '<li class="yes"><b>holds</b>: RAG answers new facts' in page and '<li class="no">' in page
    assert "tiny &lt;b&gt;" in page and "tiny <b>" not in page  # the settings, escaped
    assert "ragtune 0.1.0" in page and "torch " in page  # the versions that made the numbers


def test_the_compare_config_refuses_a_half_given_update_and_repeated_systems():
    base = {"corpus": {"path": "c.jsonl"}, "questions": {"path": "q.jsonl"}, "output": {"path": "o"},
            "finetune": {"train": {"steps": 1}}}
    CompareJobConfig.model_validate(base)
    with pytest.raises(ValueError, match="update.corpus and update.questions go together"):
        CompareJobConfig.model_validate({**base, "update": {"corpus": "u.jsonl"}})
    with pytest.raises(ValueError, match="give each of base, finetuned, rag, raft at most once"):
        CompareJobConfig.model_validate({**base, "systems": ["rag", "rag"]})


# --- the demo --------------------------------------------------------------------------------------------------------

def test_reader_records_teach_reading_on_other_people_of_the_world():
    from jobs.demo import reader_records
    from jobs.world import make_world, more_people

    measured = make_world(0, people=20)
    practice = more_people(measured, seed=1, people=300)
    assert {p.name for p in practice.people}.isdisjoint(measured.names())
    assert (practice.orgs, practice.places) == (measured.orgs, measured.places)
    records = reader_records(practice, PromptConfig(system=""), per_passage=3, seed=0)
    assert len(records) == 300
    assert not any(p.name in r["messages"][0]["content"] for r in records for p in measured.people)
    for r in records[:50]:
        m = r["messages"]
        assert m[0]["content"].startswith("Passages:\n[1] ") and m[1]["role"] == "assistant"
        doc = m[0]["content"].split("\n\nQuestion: ")[0]
        answers = [x["content"] for x in m if x["role"] == "assistant"]
        assert 1 <= len(answers) <= 3 and all(a.lower() in doc.lower() for a in answers)


def test_claims_follow_the_numbers():
    from jobs.demo import check_claims

    def split(em):
        return {"em": em, "f1": em, "n": 24, "errors": 0, "latency_p50_s": 0.1, "latency_p95_s": 0.2}

    def system(seen, held, before, after, ttk):
        return {"seen": split(seen), "held_out": split(held), "latency": {"p50_s": 0.1, "p95_s": 0.2},
                "examples": [], "data_needed": "", "cost_text": "", "maintenance": "",
                "update": {"before": split(before), "after": split(after), "time_to_knowledge_s": ttk}}

    results = {"systems": {"base": system(0.02, 0.02, 0.0, 0.0, None),
                           "finetuned": system(0.9, 0.05, 0.05, 0.8, 60.0),
                           "rag": system(0.8, 0.8, 0.1, 0.8, 5.0), "raft": system(0.85, 0.8, 0.1, 0.85, 5.0)}}
    claims = check_claims(typed(results))
    assert [c.holds for c in claims] == [True, True, True, True]
    results["systems"]["finetuned"]["held_out"] = split(0.6)  # fine-tuning "knew" facts it never saw: suspicious
    results["systems"]["raft"]["after"] = split(0.1)
    results["systems"]["raft"]["update"]["after"] = split(0.1)
    results["systems"]["rag"]["update"]["time_to_knowledge_s"] = 90.0  # slower than retraining
    got = {c.text: c.holds for c in check_claims(typed(results))}
    assert got == {"fine-tuning answers the facts it was trained on, closed-book": True,
                   "... but not facts it was not trained on": False,
                   "RAG answers new facts as soon as they are indexed": False,
                   "RAFT is at least as good as RAG": False}


def test_raft_passages_are_cut_to_the_training_length_as_the_serving_app_cuts_them(tmp_path):
    from models.generators import TinySpec, build_tiny, load_tokenizer
    from models.sft import encode_record

    words = "the river city of marlow holds a tall grey tower built by the guild of glass makers".split()
    base = str(build_tiny(tmp_path / "base", [" ".join(words)] * 50, TinySpec(layers=1, hidden=32, heads=2,
                                                                               intermediate=64, vocab=300)))
    prompt = PromptConfig(system="")
    qs = qas(4)
    long = " ".join(words * 20)  # ~340 words: three of them never fit 160 tokens
    retrieved = {q.id: [{"doc_id": q.doc_id, "title": "gold", "text": long},
                        *({"doc_id": f"other{j}", "title": f"o{j}", "text": long} for j in range(3))] for q in qs}
    gold = {q.id: retrieved[q.id][0] for q in qs}
    fit = passage_fit(base, prompt, 160)
    records = raft_records(qs, retrieved, gold, RaftConfig(gold_fraction=1.0), prompt, seed=0, k=3, fit=fit)
    tok = load_tokenizer(base)
    for q, r in zip(qs, records, strict=True):
        e = encode_record(tok, r, 160)
        assert e.n_label_tokens > 0 and len(e.input_ids) <= 160  # the answer survives the training length
        user = r["messages"][-2]["content"]
        assert user.endswith(f"Question: {q.question}") and len(user) < 3 * len(long)
        # what is left is said truthfully: the gold flag and the distractors are those still in the prompt
        assert r["raft"]["gold"] == ("[1] gold" in user or "] gold\n" in user)
        assert len(re.findall(r"^\[\d\] ", user, re.M)) == r["raft"]["gold"] + len(r["raft"]["distractors"])
    with pytest.raises(RagtuneError, match="finetune.max_length = 4"):
        passage_fit(base, prompt, 4)(qs[0].question, [], qs[0].answers[0])


def test_results_json_is_the_typed_results_key_for_key():
    """results.json as a run with an update stage writes it (the demo's shape, numbers made up): the typed results
    read it and write it back byte for byte, measurements that were not made left out rather than null."""
    from jobs.compare_results import CompareResults

    def split(em, recall=None):
        return {"n": 24, "em": em, "f1": em, "errors": 0, "latency_p50_s": 0.21, "latency_p95_s": 0.4,
                **({"recall_at_k": recall} if recall is not None else {})}

    def system(retrieves, update, text):
        r = 1.0 if retrieves else None
        return {"seen": split(0.5, r), "held_out": split(0.25, r), "latency": {"p50_s": 0.2, "p95_s": 0.5},
                "examples": [{"question": "Where was Ana born?", "answers": ["Ophir"], "said": "Ophir"}],
                "update": update, "data_needed": text, "cost_text": "12 s (24 CPU-s)", "maintenance": "-"}

    results = {
        "config": {"systems": ["base", "finetuned", "rag", "raft"], "output": {"path": "/runs/demo/compare"}},
        "questions": {"total": 96, "seen": 48, "held_out": 48, "update": 40},
        "stages": {
            "index": {"seconds": 9.5, "embed_s": 7.0, "index_s": 2.5, "docs": 34, "chunks": 38, "cpu_seconds": 19.0},
            "finetuned": {"seconds": 80.0, "records": 88, "loss_first": 3.2, "loss_last": 0.4, "cpu_seconds": 160.0},
            "raft": {"seconds": 90.0, "records": 88, "replay": 264, "with_gold": 88, "loss_first": 2.0,
                     "loss_last": None, "gpu_seconds": 90.0},
            "index_add": {"seconds": 0.27, "add": {"version": "v-00002", "docs_added": 4, "embedded_by": "this"},
                          "reload": {"version": "v-00002", "previous": "v-00001", "changed": True}}},
        "systems": {
            "base": system(False, {"before": split(0.0), "after": split(0.0)}, "nothing"),
            "finetuned": system(False, {"before": split(0.0), "after": split(0.75), "how": "retraining",
                                        "time_to_knowledge_s": 95.5,
                                        "retrain": {"seconds": 78.0, "records": 128, "cpu_seconds": 78.0}}, "QA"),
            "rag": system(True, {"before": split(0.1, 1.0), "after": split(0.9, 1.0), "how": "index add + reload",
                                 "time_to_knowledge_s": 0.5}, "the corpus"),
        },
        "seconds": 330.5,
    }
    text = json.dumps(results, indent=2)
    typed_results = CompareResults.model_validate_json(text)
    assert typed_results.to_json() == text
    assert typed_results.systems["base"].score("after").em == 0.0 and typed_results.stages.raft.cpu_seconds is None
