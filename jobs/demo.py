"""`ragtune demo`: fine-tuning vs RAG vs both, measured end to end on a fictional world, on a laptop.

    ragtune demo                                  # embedded local Ray, 2 CPU cores, no GPU: about 8 minutes
    ragtune demo output.path=runs/demo2 world.seed=1 world.people=200      # another world, a bigger one
    ragtune demo -c configs/demo/default.yaml --address ray://HEAD:10001   # the same on a cluster

Nothing is downloaded and no answer can come from pre-training: the world is made up by ``jobs.world`` from a
seed, and the generator is a tiny Llama built from a config with a tokenizer trained here. The flow:
1. the world: people, places and organisations written as short encyclopedia-style documents, templated
   questions with their answers, and an update (some people change employer, new people arrive);
2. the base generator: the tiny model learns to *read* (full fine-tuning with the finetune job: Ray Train +
   DeepSpeed, 2 workers) on questions about a separate part of the world (other people, in the same places and
   organisations), each asked with its gold passage in the serving app's prompt. It knows no fact about the
   measured people (asked closed-book it can only guess among the places, employers and professions it has
   seen), and it can read;
3. the comparison (``jobs.compare``): the corpus embedded (Ray Data) into a sharded index with BM25 beside it,
   LoRA fine-tuning on half of the facts (closed-book), RAFT (the same questions with retrieved passages), the
   serving app answering every system over HTTP, then the update and each system's time-to-knowledge;
4. the claims, checked against the measured numbers and printed with them.

The seed fixes the world, the splits, the samples and the training order. The EMs can still move between runs:
the answers are decoded in batches whose make-up depends on timing, and another machine's thread count or CPU
vector instructions change the trained models in their last bits; each moves logits slightly and can flip a near
tie (docs/benchmarks.md, "Demo determinism"). The seconds vary.
A rerun into the same ``output.path`` reuses the trained reader (``runs/reader``; an interrupted one resumes
from its last checkpoint) and rebuilds the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import textwrap
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cluster.runtime import init_ray
from configs.errors import RagtuneError
from configs.schema import FinetuneJobConfig
from configs.schema.compare import CompareJobConfig
from configs.schema.demo import DemoJobConfig
from configs.schema.serve import PromptConfig
from jobs import compare, console, finetune
from jobs.commands import job_main
from jobs.compare_report import Claim, render_html
from jobs.compare_results import Split, SystemResult, read_results
from jobs.jsonl import write_jsonl
from jobs.world import PERSON_ATTRIBUTES, Doc, Question, Update, World, make_world, more_people, update_world
from models.prompt import rag_messages
from sharding.storage import atomic_write_bytes, resolve

log = logging.getLogger("ragtune.demo")

# --- 1. the world --------------------------------------------------------------------------------------------------

def write_world(out: Path, world: World, update: Update) -> dict[str, str]:
    """The measured world as the compare job's inputs: corpus (every document), questions about its people,
    update corpus, update questions."""
    return {
        "corpus": write_jsonl(out / "corpus.jsonl", [d.record() for d in world.docs()]),
        "questions": write_jsonl(out / "questions.jsonl",
                                 [q.record() for q in world.questions(attributes=PERSON_ATTRIBUTES)]),
        "update_corpus": write_jsonl(out / "update-corpus.jsonl", [d.record() for d in update.docs]),
        "update_questions": write_jsonl(out / "update-questions.jsonl", [q.record() for q in update.questions]),
    }


# --- 2. teaching the base to read ------------------------------------------------------------------------------------

def reader_records(practice: World, prompt: PromptConfig, per_passage: int, seed: int) -> list[dict]:
    """Chat records that teach reading: a person's document as passage [1] in the serving app's prompt, a
    question about it, its answer; then up to ``per_passage - 1`` more questions about the same document as
    further turns (more answers to learn from per token of passage). One record per person."""
    rng = random.Random(seed)
    records = []
    docs = {d.id: d for d in practice.docs()}
    by_doc: dict[str, list[Question]] = {}
    for q in practice.questions(attributes=PERSON_ATTRIBUTES):
        by_doc.setdefault(q.doc_id, []).append(q)
    for doc_id, qs in by_doc.items():
        picked = _one_per_attribute(qs, rng)[:per_passage]
        d: Doc = docs[doc_id]
        messages = rag_messages([{"role": "user", "content": picked[0].question}],
                                [{"title": d.title, "text": d.text}], prompt)
        messages.append({"role": "assistant", "content": picked[0].answers[0]})
        for q in picked[1:]:
            messages += [{"role": "user", "content": q.question}, {"role": "assistant", "content": q.answers[0]}]
        records.append({"id": doc_id, "messages": messages})
    rng.shuffle(records)
    return records


def _one_per_attribute(qs: Sequence[Question], rng: random.Random) -> list[Question]:
    by_attr: dict[str, list[Question]] = {}
    for q in qs:
        by_attr.setdefault(q.attribute, []).append(q)
    picked = [rng.choice(v) for v in by_attr.values()]
    rng.shuffle(picked)
    return picked


def reader_stamp(cfg: DemoJobConfig, exclude: set[str]) -> str:
    """What the reader is made from: its settings, the prompt it reads in, the world's geography and the names
    it must not see. A reader is reused only for the same."""
    geography = {k: v for k, v in cfg.world.model_dump().items() if k in ("seed", "orgs", "places")}
    reader = cfg.reader.model_dump(mode="json")
    reader["train"].pop("stop_after_steps", None)  # when to pause, not what is learned: a paused reader resumes
    return json.dumps({"reader": reader, "prompt": cfg.prompt.model_dump(mode="json"),
                       "world": geography, "exclude": hashlib.sha256("\n".join(sorted(exclude)).encode()).hexdigest()},
                      sort_keys=True)


def train_reader(cfg: DemoJobConfig, out: Path, world: World, exclude: set[str]) -> str:
    """The base generator's folder: the tiny model trained to read on other people of ``world`` (none of its
    people, nor any name in ``exclude``), reused when that run already finished for the same settings, resumed
    from its last checkpoint when it was interrupted (the finetune job's resume), trained afresh otherwise."""
    r = cfg.reader
    run_dir = out / "runs" / "reader"
    model, stamp = run_dir / "outputs" / "model", run_dir / "made-from.json"
    made_from = reader_stamp(cfg, exclude)
    done = run_dir / "outputs" / "summary.json"  # written last, atomically, by the finetune job
    if done.is_file() and json.loads(done.read_text()).get("finished") and stamp.is_file() and \
            stamp.read_text() == made_from:
        log.info("reusing the reader trained for these settings at %s", model)
        return str(model)
    if run_dir.exists() and not (stamp.is_file() and stamp.read_text() == made_from):
        log.info("%s was made for other settings: training the reader again", run_dir)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(resolve(str(stamp)), made_from.encode())  # first: an interrupted run is resumed, not redone
    practice = more_people(world, cfg.world.seed + 7919, r.people, exclude)
    records = reader_records(practice, cfg.prompt, r.questions_per_passage, cfg.world.seed)
    train = write_jsonl(out / "world" / "reader.jsonl", records)
    fcfg = FinetuneJobConfig(
        model={"name": "tiny", "tiny": r.tiny.model_dump()},
        data={"train": train, "validation_fraction": 0.02, "max_length": 256},
        train=r.train, deepspeed=r.deepspeed, scaling=r.scaling,
        run={"name": "reader", "storage_path": str(out / "runs")}, cluster=cfg.cluster)
    log.info("teaching the tiny base to read: %d records about %d other people, %d steps", len(records),
             len(practice.people), r.train.steps)
    summary = finetune.run(fcfg)
    if not summary.finished:
        raise RagtuneError(f"the reader's training stopped at step {summary.steps} of {r.train.steps}. Fix: rerun "
                           "`ragtune demo` with the same settings (it resumes from the last checkpoint)")
    return str(model)


# --- 4. the claims ---------------------------------------------------------------------------------------------------

def _em(systems: Mapping[str, SystemResult], system: str, split: Split) -> float | None:
    s = systems.get(system)
    m = None if s is None else s.score(split)
    return None if m is None else m.em


def check_claims(systems: Mapping[str, SystemResult]) -> list[Claim]:
    """What the comparison claims, against the numbers it measured. A claim whose systems were not run, or
    whose update stage was skipped, is left out."""
    em = lambda s, split: _em(systems, s, split)  # noqa: E731
    ttk = {n: s.update.time_to_knowledge_s if s.update else None for n, s in systems.items()}
    out = []
    ft_seen, ft_held, base_seen = em("finetuned", "seen"), em("finetuned", "held_out"), em("base", "seen")
    if ft_seen is not None and base_seen is not None and ft_held is not None:
        out.append(Claim("fine-tuning answers the facts it was trained on, closed-book",
                         ft_seen >= 0.5 and ft_seen >= base_seen + 0.3,
                         f"fine-tuned EM on seen facts {ft_seen:.0%} vs base {base_seen:.0%}"))
        before = em("finetuned", "before")
        new = f", on the update's facts before retraining {before:.0%}" if before is not None else ""
        out.append(Claim("... but not facts it was not trained on", ft_held <= base_seen + 0.15 and
                         (before is None or before <= base_seen + 0.15),
                         f"fine-tuned EM on held-out facts {ft_held:.0%}{new}"))
    rag_before, rag_after = em("rag", "before"), em("rag", "after")
    if rag_before is not None and rag_after is not None:
        rag_ttk, ft_ttk = ttk.get("rag"), ttk.get("finetuned")
        faster = rag_ttk is not None and (ft_ttk is None or rag_ttk < ft_ttk)
        ft = f"; fine-tuned {ft_ttk:.0f} s by retraining" if ft_ttk is not None else ""
        out.append(Claim("RAG answers new facts as soon as they are indexed",
                         rag_after >= 0.5 and rag_after >= rag_before + 0.3 and faster,
                         f"RAG EM on the update's facts {rag_before:.0%} before -> {rag_after:.0%} "
                         f"{rag_ttk or 0:.1f} s after they arrived{ft}"))
    pairs = {x: (raft_em, rag_em) for x in ("seen", "held_out", "after")
             if (raft_em := em("raft", x)) is not None and (rag_em := em("rag", x)) is not None}
    if pairs:
        raft = sum(a for a, _ in pairs.values()) / len(pairs)
        rag = sum(b for _, b in pairs.values()) / len(pairs)
        detail = ", ".join(f"{x.replace('_', '-').replace('after', 'new')} {a:.0%} vs {b:.0%}"
                           for x, (a, b) in pairs.items())
        out.append(Claim("RAFT is at least as good as RAG", raft >= rag,
                         f"RAFT vs RAG EM: {detail} (mean {raft:.0%} vs {rag:.0%})"))
    return out


def print_claims(claims: Sequence[Claim], width: int = 88) -> str:
    """The verdicts, each wrapped to ``width`` columns (a terminal of 80-100), printed; the text returned."""
    lines = ["", "What the comparison claims, and what this run measured:"]
    for c in claims:
        lines += textwrap.wrap(f"[{'yes' if c.holds else 'NO '}] {c.text}: {c.evidence}", width,
                               initial_indent="  ", subsequent_indent="        ")
    text = "\n".join(lines)
    console.out(text)
    return text


# --- the job ---------------------------------------------------------------------------------------------------------

@dataclass
class DemoSummary:
    output: str
    report: str
    claims_hold: int
    claims: int
    seconds: float

    def line(self) -> str:
        return (f"demo finished in {self.seconds / 60:.1f} min: {self.claims_hold} of {self.claims} claims hold; "
                f"report {self.report}, as a page {Path(self.report).with_name('report.html')}")


class Stages:
    """Progress of the demo's stages: which one, how long so far."""

    def __init__(self, names: Sequence[str]):
        self.names, self.i, self.t0 = list(names), 0, time.perf_counter()

    def __call__(self, name: str) -> None:
        self.i += 1
        total = max(len(self.names), self.i)
        log.info("[demo %d/%d, %.0fs] %s", self.i, total, time.perf_counter() - self.t0, name)


def compare_config(cfg: DemoJobConfig, inputs: Mapping[str, str], base: str) -> CompareJobConfig:
    out = Path(cfg.output.path)
    raft = cfg.raft.model_copy(update={"replay": str(out / "world" / "reader.jsonl")}) if cfg.raft_replay \
        else cfg.raft
    return CompareJobConfig(
        corpus={"path": inputs["corpus"]},
        questions={"path": inputs["questions"], "finetune_fraction": cfg.split.finetune_fraction,
                   "max_eval": cfg.split.max_eval, "seed": cfg.world.seed},
        update={"corpus": inputs["update_corpus"], "questions": inputs["update_questions"]},
        model={"name": base}, finetune=cfg.finetune, raft=raft, retrieval=cfg.retrieval, prompt=cfg.prompt,
        answer=cfg.answer, output={"path": str(out / "compare")}, cluster=cfg.cluster)


def run(cfg: DemoJobConfig) -> DemoSummary:
    t0 = time.perf_counter()
    out = Path(cfg.output.path).resolve()  # absolute: Ray's workers load the reader from it in their own cwd
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"path": str(out)})})
    stages = Stages(["the world", "teach the base to read", "embed + index", "fine-tune", "RAFT", "serve + answer",
                     "update", "claims"])
    stages("the world: people, places, organisations, questions and an update, from the seed")
    w = cfg.world
    world = make_world(w.seed, people=w.people, orgs=w.orgs, places=w.places)
    update = update_world(world, w.seed + 1, changed=w.changed, added=w.added)
    inputs = write_world(out / "world", world, update)
    log.info("%d documents, %d questions about %d people; the update: %d changed documents, %d new, %d questions",
             len(world.docs()), len(world.questions(attributes=PERSON_ATTRIBUTES)), len(world.people),
             len(update.changed), len(update.added), len(update.questions))

    init_ray(cfg.cluster)
    stages("teach the tiny base to read (the finetune job: full fine-tuning on other people of the world)")
    base = train_reader(cfg, out, world, update.world.names())
    summary = compare.run(compare_config(cfg, inputs, base), on_stage=stages)

    stages("the claims")
    results = read_results(out / "compare" / "results.json")
    claims = check_claims(results.systems)
    text = print_claims(claims)
    report = resolve(str(out / "compare" / "report.md"))
    atomic_write_bytes(report, (Path(report.path).read_text() + text + "\n").encode())
    chart = (out / "compare" / "comparison.png").read_bytes()
    atomic_write_bytes(resolve(str(out / "compare" / "report.html")), render_html(results, chart, claims).encode())
    return DemoSummary(str(out), summary.report, sum(c.holds for c in claims), len(claims), time.perf_counter() - t0)


if __name__ == "__main__":  # python -m jobs.demo --config FILE [overrides] (what `ray job submit` calls)
    job_main("demo", run)
