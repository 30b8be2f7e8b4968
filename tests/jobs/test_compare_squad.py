"""`ragtune compare` end to end on a slice of SQuAD v1.1 (real data) with the tiny model, on the session's local Ray:
every system is built by the real jobs and asked through the serving app. A random tiny generator's answers mean
nothing, but retrieval recall of the gold paragraph does, and everything the report promises is there."""

import json

import pytest

from configs import CONFIG_DIR
from configs.schema import CompareJobConfig, load_config


@pytest.fixture(scope="module")
def squad_slice(squad_retrieval, tmp_path_factory):
    """The first 24 paragraphs of SQuAD v1.1 dev and their questions."""
    out = tmp_path_factory.mktemp("squad-slice")
    corpus = [json.loads(line) for line in (squad_retrieval / "corpus.jsonl").read_text().splitlines()[:24]]
    ids = {d["_id"] for d in corpus}
    qa = [json.loads(line) for line in (squad_retrieval / "qa.jsonl").read_text().splitlines()]
    qa = [q for q in qa if q["paragraph_id"] in ids]
    (out / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (out / "qa.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qa))
    return out, len(corpus), len(qa)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compare_on_a_squad_slice_reports_every_system(ray_2_cpus, squad_slice, tmp_path, capsys):
    from jobs.compare import run

    folder, n_docs, n_qa = squad_slice
    cfg = load_config(CompareJobConfig, CONFIG_DIR / "compare" / "squad-slice.yaml", [
        f"corpus.path={folder / 'corpus.jsonl'}", f"questions.path={folder / 'qa.jsonl'}",
        f"output.path={tmp_path / 'out'}", "questions.max_eval=24", "systems=[base,rag,raft]",
        "finetune.train.steps=6",
        "finetune.train.checkpoint_every=6", "finetune.train.eval_every=6", "answer.port=8431"])
    summary = run(cfg)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["questions"]["total"] == n_qa and results["questions"]["seen"] + \
        results["questions"]["held_out"] == n_qa
    # closed-book fine-tuning is the demo's to show (tests/jobs/test_demo.py): a tiny model learns no SQuAD facts
    assert set(results["systems"]) == {"base", "rag", "raft"} and "finetuned" not in results["stages"]
    for name, s in results["systems"].items():
        for split in ("seen", "held_out"):
            assert s[split]["n"] == 24 and s[split]["errors"] == 0, (name, split, s[split])
            assert 0 <= s[split]["em"] <= s[split]["f1"] + 1e-9 <= 1 + 1e-9
        assert s["latency"]["p50_s"] > 0
    # retrieval is real: the gold paragraph is among the 3 passages for most SQuAD questions (hybrid search over
    # 24 paragraphs); closed-book systems cite nothing
    for name in ("rag", "raft"):
        assert results["systems"][name]["held_out"]["recall_at_k"] >= 0.7, results["systems"][name]
    assert "recall_at_k" not in results["systems"]["base"]["seen"]
    st = results["stages"]
    assert st["index"]["docs"] == n_docs and st["index"]["cpu_seconds"] > 0
    assert st["raft"]["records"] == results["questions"]["seen"]
    assert 0 < st["raft"]["with_gold"] <= st["raft"]["records"]
    raft = [json.loads(line) for line in (tmp_path / "out" / "data" / "raft.jsonl").read_text().splitlines()]
    # retrieval.k = 3 passages per record, cut to finetune.max_length as the serving app cuts them: most keep all
    # three, none holds more, and every record keeps its answer (the finetune job refuses one that does not)
    sizes = [r["raft"]["gold"] + len(r["raft"]["distractors"]) for r in raft]
    assert max(sizes) == 3 and sizes.count(3) >= len(sizes) / 2 and min(sizes) >= 1, sizes
    # the report: the table, its PNG, and the summary line
    report = (tmp_path / "out" / "report.md").read_text()
    assert report.startswith("| approach |") and report.count("\n| ") == 3  # a row per system
    assert (tmp_path / "out" / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "RAFT (fine-tuned + RAG)" in capsys.readouterr().out and "compared 3 systems" in summary.line()
