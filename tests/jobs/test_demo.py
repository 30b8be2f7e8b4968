"""A reduced `ragtune demo` end to end on the session's local Ray: a smaller world, a cheaper reader (800 steps in
batches of 8 on 3,000 people instead of 1,200 of 16 on 6,000: ~2.5 instead of ~4.5 minutes for the reader job),
100 LoRA steps instead of 150 and fewer questions, every stage through the real jobs and the serving app. Measured
with these settings: 5.5 min, 4 of 4 claims, RAG 79% / 83% on seen / held-out, RAFT 100% / 92%; with 600 reader
steps the reader read worse (RAG 58% on seen) and 3 of 4 claims held. It asserts the direction of each claim the
comparison makes, not exact numbers."""

import json
from pathlib import Path

import pytest

from configs import CONFIG_DIR
from configs.schema import DemoJobConfig, load_config

REDUCED = [
    "world.people=24", "world.changed=4", "world.added=4",
    "reader.people=3000", "reader.train.micro_batch=8", "reader.train.steps=800",
    "finetune.train.steps=100",
    "split.max_eval=24",
    "answer.port=8432",
]


@pytest.fixture(scope="module")
def demo(ray_2_cpus, tmp_path_factory):
    """Run from its own folder with a relative output path, as the README's `ragtune demo` writes runs/demo: the
    training workers and serving replicas must still find every model."""
    import os

    from jobs.demo import run

    here = tmp_path_factory.mktemp("demo")
    cfg = load_config(DemoJobConfig, CONFIG_DIR / "demo" / "default.yaml", [*REDUCED, "output.path=runs/demo"])
    cwd = os.getcwd()
    os.chdir(here)
    try:
        summary = run(cfg)
    finally:
        os.chdir(cwd)
    out = here / "runs" / "demo"
    assert Path(summary.output) == out.resolve()
    return out, summary, json.loads((out / "compare" / "results.json").read_text())


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_demo_shows_each_claim(demo):
    out, summary, results = demo
    s = {name: sys for name, sys in results["systems"].items()}

    def em(name, split):
        return s[name]["update"][split]["em"] if split in ("before", "after") else s[name][split]["em"]

    # the base knows nothing of the measured people: chance among the places, employers and professions
    assert em("base", "seen") <= 0.25 and em("base", "held_out") <= 0.25
    # fine-tuning: the facts it was trained on, closed-book, and not the others
    assert em("finetuned", "seen") >= em("base", "seen") + 0.3
    # (guessing among the world's 10 cities, 8 employers and 20 professions, which the LoRA's training on the seen
    # questions makes it better at than the base: 8-17% measured on 24 questions; 30% is far from knowing)
    assert em("finetuned", "held_out") <= max(em("base", "held_out") + 0.15, 0.3)
    assert em("finetuned", "before") <= 0.3
    # RAG reads what it retrieves: held-out facts, and the update's as soon as it is indexed
    assert em("rag", "held_out") >= 0.5 and em("rag", "after") >= em("rag", "before") + 0.3
    assert s["rag"]["update"]["time_to_knowledge_s"] < s["finetuned"]["update"]["time_to_knowledge_s"]
    # RAFT at least as good as RAG on average (a question or two of slack: 24 questions per split)
    mean = {n: sum(em(n, x) for x in ("seen", "held_out", "after")) / 3 for n in ("rag", "raft")}
    assert mean["raft"] >= mean["rag"] - 0.05, mean
    # the demo's own verdicts, claim by claim: the two whose margins are wide must hold as the demo states them;
    # the other two compare EMs of 24 questions (one question = 4 points) and are asserted above with that slack,
    # so a run may print NO for them while the test passes (measured: they held, 4 of 4)
    from jobs.compare_results import read_results
    from jobs.demo import check_claims

    verdicts = {c.text: c.holds for c in check_claims(read_results(out / "compare" / "results.json").systems)}
    report = (out / "compare" / "report.md").read_text()
    assert len(verdicts) == summary.claims == 4 and summary.claims_hold == sum(verdicts.values()), report
    assert verdicts["fine-tuning answers the facts it was trained on, closed-book"], report
    assert verdicts["RAG answers new facts as soon as they are indexed"], report


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_demo_writes_its_inputs_report_json_and_chart(demo):
    out, summary, results = demo
    world = out / "world"
    for name in ("corpus.jsonl", "questions.jsonl", "update-corpus.jsonl", "update-questions.jsonl", "reader.jsonl"):
        assert (world / name).stat().st_size > 0, name
    report = (out / "compare" / "report.md").read_text()
    assert report.startswith("| approach |") and "What the comparison claims" in report
    assert (out / "compare" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    page = (out / "compare" / "report.html").read_text()  # the table, the verdicts and the chart in one page
    assert page.count("<tr>") == 5 and page.count('<li class="') == summary.claims and "https://" not in page
    assert "data:image/png;base64," in page
    assert results["stages"]["index_add"]["add"]["docs_added"] > 0 and results["stages"]["index_add"]["seconds"] > 0
    assert f"{summary.claims_hold} of {summary.claims} claims hold" in summary.line()


def test_the_reader_is_reused_or_resumed_only_for_the_same_settings():
    from jobs.demo import reader_stamp

    def stamp(*overrides, exclude=frozenset({"Zomglen Baithsar"})):
        cfg = load_config(DemoJobConfig, CONFIG_DIR / "demo" / "default.yaml", list(overrides))
        return reader_stamp(cfg, set(exclude))

    same = stamp()
    assert stamp("reader.train.stop_after_steps=100") == same  # when to pause is not what is learned
    assert stamp("world.people=24") == same  # the measured people are in `exclude`, not in the settings
    for other in (["reader.train.steps=600"], ["reader.people=3000"], ["world.seed=1"], ["prompt.system=Read."]):
        assert stamp(*other) != same, other
    assert stamp(exclude={"Another Name"}) != same
