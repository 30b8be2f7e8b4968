"""`ragtune compare`: base vs fine-tuned vs RAG vs RAFT, measured on the same questions, in one command.

Laptop (embedded local Ray; a slice of SQuAD with the tiny model; ``ragtune demo`` runs the same job on a
fictional world)::

    ragtune compare -c configs/compare/squad-slice.yaml

Cluster (paths on storage every node sees; the same config with another model and resources)::

    ray job submit --working-dir . -- python -m jobs.compare --config configs/compare/squad-slice.yaml

The flow, top to bottom:
1. check the inputs, read the questions and split them by gold document (a stable hash): the *seen* questions'
   facts are what the fine-tuned systems train on; the *held-out* ones are in the corpus but never trained on;
2. RAG's index: embed the corpus (the embed job on Ray Data) and build the sharded index (the index job);
3. fine-tuned: LoRA on the seen question/answer pairs and/or the corpus text (the finetune job: Ray Train +
   DeepSpeed);
4. RAFT: LoRA on the seen questions with retrieved passages: the gold passage (in ``raft.gold_fraction`` of the
   records) among hard distractors retrieved from the real index, in the very prompt the serving app builds;
5. the serving app (base + both adapters, retrieval from the index) on 127.0.0.1; every system answers the
   seen and held-out questions over HTTP: base and fine-tuned closed-book, RAG and RAFT with retrieval;
6. the update (optional): new and changed documents arrive. RAG and RAFT: ``index add`` and a reload of the
   serving app; fine-tuned: retraining on the seen and the new question/answer pairs. Time-to-knowledge is the
   seconds from the update's arrival until a system serves it, and its accuracy on the affected questions then;
7. the report: ``report.md`` (a table shaped like the comparison people decide with), ``report.html`` (the same
   with the chart inline, one self-contained page), ``results.json`` (every number), ``comparison.png``.

What is measured is what is served: answers come from the serving app's own prompt assembly and generation
(``models.prompt``, ``serving.rag``), asked over its HTTP API (``serving.client``), and RAFT's training prompts are
built by the same functions (``models.raft``). Beside this file: the questions (``jobs.compare_questions``), the
scores (``jobs.compare_scoring``), the typed results (``jobs.compare_results``) and the report
(``jobs.compare_report``).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow.parquet as pq

from cluster.runtime import init_ray
from configs.errors import RagtuneError
from configs.schema import EmbedJobConfig, FinetuneJobConfig, IndexJobConfig, ServeJobConfig
from configs.schema.compare import CompareJobConfig
from configs.schema.finetune import TrainConfig
from jobs import console, embed, finetune, freshness
from jobs import index as index_job
from jobs.commands import job_main
from jobs.compare_questions import QA, read_questions, sample, split_questions
from jobs.compare_report import describe, plot, render_html, render_table, render_terminal
from jobs.compare_results import (
    CompareResults,
    Example,
    IndexAddStage,
    IndexStage,
    Latency,
    QuestionCounts,
    Retrain,
    SplitScore,
    Stages,
    SystemResult,
    TrainStage,
    Update,
)
from jobs.compare_scoring import Answer, examples, latency, score
from jobs.jsonl import write_jsonl
from jobs.progress import Rate
from jobs.serve import wait_ready
from models.generators import TinySpec, absolute_model_name, build_tiny
from models.raft import ChatRecord, corpus_records, passage_fit, qa_records, raft_records, replay_records
from serving.app import ServeAppArgs, build_app
from serving.client import RagtuneClient, Retrieval
from serving.rag import LocalRetriever
from sharding.corpus import list_corpus
from sharding.storage import atomic_write_bytes, resolve

log = logging.getLogger("ragtune.compare")

# How each system is asked: (the model it is served as, whether it retrieves).
SYSTEM_MODELS = {"base": ("base", False), "finetuned": ("finetuned", False), "rag": ("base", True),
                 "raft": ("raft", True)}


# --- the job -------------------------------------------------------------------------------------------------------

@dataclass
class CompareSummary:
    output: str
    report: str
    systems: dict[str, dict[str, float | None]]  # per system: seen_em, held_out_em, new_em, time_to_knowledge_s
    seconds: float

    def line(self) -> str:
        parts = []
        for name, s in self.systems.items():
            new = "" if s.get("new_em") is None else f", new {s['new_em']:.0%}"
            ttk = "" if s.get("time_to_knowledge_s") is None else f" ({s['time_to_knowledge_s']:.0f} s to learn it)"
            parts.append(f"{name}: seen {s['seen_em']:.0%}, held-out {s['held_out_em']:.0%}{new}{ttk}")
        return f"compared {len(self.systems)} systems in {self.seconds:.0f}s: " + "; ".join(parts) + \
            f". Report: {self.report}"


@dataclass(frozen=True)
class Questions:
    """The questions of one comparison: all of them, split by gold document, and the samples that are asked."""

    all: list[QA]
    seen: list[QA]  # their facts are what the fine-tuned systems train on
    held: list[QA]  # in the corpus, never trained on
    seen_eval: list[QA]
    held_eval: list[QA]
    update: list[QA]  # answered by the update's documents (none without an update stage)
    update_eval: list[QA]


class Cost(NamedTuple):
    """Resource-seconds of a stage; None for a kind of resource it did not hold."""

    cpu_seconds: float | None = None
    gpu_seconds: float | None = None


@dataclass(frozen=True)
class Cluster:
    cpus: float
    gpus: float


@dataclass(frozen=True)
class Measured:
    """A system's answers to the seen and held-out questions, scored."""

    seen: SplitScore
    held_out: SplitScore
    latency: Latency
    examples: list[Example]


@dataclass(frozen=True)
class UpdateOutcome:
    index_add: IndexAddStage
    systems: dict[str, Update]


def run(cfg: CompareJobConfig, on_stage: Callable[[str], None] | None = None) -> CompareSummary:
    """Build and measure every system of ``cfg.systems``; ``on_stage`` hears each stage's name (the demo's
    progress)."""
    t_start = time.perf_counter()
    qs = plan_questions(cfg, check(cfg))
    # absolute: the training workers and the serving replicas load models from it in their own working directories
    out_abs = str(Path(cfg.output.path).resolve())
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"path": out_abs})})
    stage = on_stage or (lambda name: log.info("== %s", name))

    init_ray(cfg.cluster)
    prepare_output(cfg)
    docs = read_corpus_records(cfg, cfg.corpus.path)
    base = build_base(cfg, docs, qs.all + qs.update)
    cluster = _cluster_resources()

    stage("embed + index the corpus (RAG)")
    index_stage = build_index(cfg, cluster)
    val = write_jsonl(Path(cfg.output.path) / "data" / "validation.jsonl",
                      qa_records(sample(qs.seen, 64, cfg.questions.seed + 3)))
    finetuned_stage = raft_stage = None
    if "finetuned" in cfg.systems:
        stage("fine-tune on the seen question/answer pairs (LoRA, Ray Train + DeepSpeed)")
        finetuned_stage = train_finetuned(cfg, qs.seen, docs, base, val, cluster)
    if "raft" in cfg.systems:
        stage("RAFT: fine-tune on the seen questions with retrieved passages (gold + hard distractors)")
        raft_stage = train_raft(cfg, qs.seen, base, val, cluster)

    stage("serve: the Ray Serve app (OpenAI-compatible API) answers every system's questions over HTTP")
    app = App(serve_config(cfg, base, adapters(cfg, bool(qs.update))))
    try:
        measured = answer_systems(cfg, app.client, qs)
        update = None
        if qs.update:
            stage("update: new and changed documents arrive; time-to-knowledge of each system")
            update = update_systems(cfg, app, qs, docs, base, val, cluster)
    finally:
        app.stop()

    stages = Stages(index=index_stage, finetuned=finetuned_stage, raft=raft_stage,
                    index_add=update.index_add if update else None)
    results = assemble(cfg, qs, stages, measured, update, t_start)
    return write_report(cfg, results)


# --- 1. questions ----------------------------------------------------------------------------------------------------

def check(cfg: CompareJobConfig) -> list[QA]:
    """What can fail before any work, without Ray or torch: the questions, the update, the sub-jobs' inputs."""
    qas = read_questions(cfg.questions.path)
    if cfg.update.questions:
        read_questions(cfg.update.questions, "update.questions")
    if "://" in cfg.output.path:
        raise RagtuneError(f"output.path = {cfg.output.path!r}: the comparison writes its training records and "
                           "report with local file access. Fix: give a local folder, or on a cluster a mount every "
                           "node shares (e.g. /mnt/shared/compare)")
    embed.check(embed_config(cfg))
    if cfg.model.name.startswith((".", "/", "~")) and not Path(cfg.model.name).expanduser().exists():
        raise RagtuneError(f"model.name = {cfg.model.name!r}: no such folder. Fix: give a local folder of a "
                           "transformers causal LM, a hub id in the local cache, or tiny")
    seen, held = split_questions(qas, cfg.questions.finetune_fraction, cfg.questions.seed)
    if not seen or not held:
        raise RagtuneError(f"questions.finetune_fraction = {cfg.questions.finetune_fraction} leaves "
                           f"{len(seen)} seen and {len(held)} held-out questions of {len(qas)}: both are needed. "
                           "Fix: more questions (or documents), or a fraction nearer 0.5")
    return qas


def plan_questions(cfg: CompareJobConfig, qas: list[QA]) -> Questions:
    """The split (by gold document) and the seeded samples each system answers."""
    q = cfg.questions
    seen, held = split_questions(qas, q.finetune_fraction, q.seed)
    update = read_questions(cfg.update.questions, "update.questions") if cfg.update.questions else []
    qs = Questions(all=qas, seen=seen, held=held, seen_eval=sample(seen, q.max_eval, q.seed),
                   held_eval=sample(held, q.max_eval, q.seed + 1), update=update,
                   update_eval=sample(update, q.max_eval, q.seed + 2))
    log.info("%d questions: %d seen (fine-tuned on), %d held out; answering %d + %d%s", len(qas), len(seen),
             len(held), len(qs.seen_eval), len(qs.held_eval),
             f" + {len(qs.update_eval)} after the update" if update else "")
    return qs


# --- 2. RAG's index --------------------------------------------------------------------------------------------------

def build_index(cfg: CompareJobConfig, cluster: Cluster) -> IndexStage:
    """Embed the corpus (the embed job) and build the sharded index (the index job)."""
    e = embed.run(embed_config(cfg))
    ix = index_job.run(index_config(cfg))
    seconds = e.seconds + ix.seconds
    cost = _resource_seconds(seconds, cluster)
    return IndexStage(seconds=seconds, embed_s=e.seconds, index_s=ix.seconds, docs=e.docs, chunks=e.chunks,
                      cpu_seconds=cost.cpu_seconds, gpu_seconds=cost.gpu_seconds)


# --- 3/4. fine-tuned and RAFT ----------------------------------------------------------------------------------------

def train_finetuned(cfg: CompareJobConfig, seen: Sequence[QA], docs: Sequence[Mapping[str, Any]], base: str,
                    val: str, cluster: Cluster) -> TrainStage:
    """LoRA on the seen facts, closed-book (``finetune.data``: the Q/A pairs, the corpus text, or both)."""
    records = finetune_records(cfg, seen, docs)
    path = write_jsonl(Path(cfg.output.path) / "data" / "finetuned.jsonl", records)
    ft = finetune.run(finetune_config(cfg, "finetuned", base, path, val))
    cost = _training_seconds(ft.seconds, cfg, cluster)
    return TrainStage(seconds=ft.seconds, records=len(records), loss_first=ft.loss_first, loss_last=ft.loss_last,
                      cpu_seconds=cost.cpu_seconds, gpu_seconds=cost.gpu_seconds)


def train_raft(cfg: CompareJobConfig, seen: Sequence[QA], base: str, val: str, cluster: Cluster) -> TrainStage:
    """LoRA on the seen questions with passages from the real index, in the serving prompt (``models.raft``)."""
    retrieved, gold = gold_and_retrieved(_join(cfg.output.path, "index"), seen, cfg)
    seed = cfg.questions.seed
    records = raft_records(seen, retrieved, gold, cfg.raft, cfg.prompt, seed, cfg.retrieval.k,
                           passage_fit(base, cfg.prompt, cfg.finetune.max_length))
    replay = replay_records(cfg.raft.replay, round(cfg.raft.replay_ratio * len(records)), seed) \
        if cfg.raft.replay else []
    path = write_jsonl(Path(cfg.output.path) / "data" / "raft.jsonl", [*records, *replay])
    rf = finetune.run(finetune_config(cfg, "raft", base, path, val, cfg.raft.train))
    cost = _training_seconds(rf.seconds, cfg, cluster)
    return TrainStage(seconds=rf.seconds, records=len(records), replay=len(replay),
                      with_gold=sum(r["raft"]["gold"] for r in records), loss_first=rf.loss_first,
                      loss_last=rf.loss_last, cpu_seconds=cost.cpu_seconds, gpu_seconds=cost.gpu_seconds)


def finetune_records(cfg: CompareJobConfig, qas: Sequence[QA], docs: Sequence[Mapping[str, Any]]) -> list[ChatRecord]:
    kind = cfg.finetune.data
    return (qa_records(qas) if kind in ("qa", "both") else []) + (corpus_records(docs) if kind in ("corpus", "both")
                                                                  else [])


def gold_and_retrieved(index_path: str, qas: Sequence[QA], cfg: CompareJobConfig) -> tuple[
        dict[str, list[dict[str, Any]]], dict[str, dict[str, Any] | None]]:
    """Per question, the passages the real index retrieves (``raft.candidates``, best first) and its gold passage
    (the best-ranked chunk of its document; searched for with a doc_id filter when not among the candidates)."""
    retriever = LocalRetriever(index_path, mode=cfg.retrieval.mode)
    retrieved: dict[str, list[dict[str, Any]]] = {}
    gold: dict[str, dict[str, Any] | None] = {}
    for q in qas:
        hits = [h.model_dump() for h in retriever.search(q.question, cfg.raft.candidates)]
        retrieved[q.id] = hits
        g = next((h for h in hits if q.doc_id is not None and h["doc_id"] == q.doc_id), None)
        if g is None and q.doc_id is not None:
            found = retriever.search(q.question, 1, {"doc_id": q.doc_id})
            g = found[0].model_dump() if found else None
        gold[q.id] = g
    return retrieved, gold


# --- 5. serving and answering ----------------------------------------------------------------------------------------

def answer_systems(cfg: CompareJobConfig, client: RagtuneClient, qs: Questions) -> dict[str, Measured]:
    """Every system answers the seen and the held-out questions through the serving app."""
    out: dict[str, Measured] = {}
    rate = Rate(len(cfg.systems) * (len(qs.seen_eval) + len(qs.held_eval)), "questions", stage="answer")
    for name in cfg.systems:
        seen = ask_system(client, name, qs.seen_eval, cfg, rate)
        held = ask_system(client, name, qs.held_eval, cfg, rate)
        k = cfg.retrieval.k if SYSTEM_MODELS[name][1] else None
        m = out[name] = Measured(seen=score(qs.seen_eval, seen, k), held_out=score(qs.held_eval, held, k),
                                 latency=latency([*seen, *held]), examples=examples(qs.held_eval, held))
        log.info("%s: seen EM %.0f%%, held-out EM %.0f%%", name, 100 * m.seen.em, 100 * m.held_out.em)
    return out


def ask_system(client: RagtuneClient, system: str, qas: Sequence[QA], cfg: CompareJobConfig,
               rate: Rate | None = None) -> list[Answer]:
    model, retrieval = SYSTEM_MODELS[system]
    return ask_all(client, model, retrieval, qas, cfg, rate, system)


def ask_all(client: RagtuneClient, model: str, retrieval: bool, qas: Sequence[QA],
            cfg: CompareJobConfig, rate: Rate | None = None, system: str = "") -> list[Answer]:
    """Ask the serving app every question as served ``model``, greedy, closed-book or with ``retrieval.k``
    passages in ``retrieval.mode``, ``answer.concurrency`` requests in flight; per answer its text, latency and
    cited documents (a failed request is an empty answer with its error). Each answer counts in ``rate``."""
    r, a = cfg.retrieval, cfg.answer

    def one(q: QA) -> Answer:
        t0 = time.perf_counter()
        try:
            reply = client.chat([{"role": "user", "content": q.question}], model=model,
                                retrieval=Retrieval(k=r.k, mode=r.mode) if retrieval else False,
                                max_tokens=a.defaults.max_tokens, temperature=0.0)
        except RagtuneError as e:
            return Answer(q.id, "", time.perf_counter() - t0, error=str(e))
        return Answer(q.id, reply.text, time.perf_counter() - t0, [c["doc_id"] for c in reply.citations])

    answers, last = [], 0.0
    with ThreadPoolExecutor(a.concurrency) as pool:
        for answer in pool.map(one, qas):
            answers.append(answer)
            if rate is not None:
                rate.add(1)
                if time.perf_counter() - last > 1.0 or rate.done == rate.total:
                    rate.log(log, f"{system or model}: ", figure=f"{system or model}, {len(answers)}/{len(qas)}")
                    last = time.perf_counter()
    failed = [x for x in answers if x.error]
    if failed:
        log.warning("%d of %d requests to %s failed, e.g. %s", len(failed), len(answers), model, failed[0].error)
    return answers


class App:
    """The serving app of the comparison in this process's Ray, at ``http://127.0.0.1:<answer.port>/<app name>``.

    A Ray that already runs Serve keeps its instance (and its HTTP port, which ``answer.port`` must then name);
    otherwise Serve is started here and shut down again by :meth:`stop`.
    """

    def __init__(self, serve_cfg: ServeJobConfig):
        from ray import serve

        self.cfg = serve_cfg
        self.started_serve = not _serve_running()
        if self.started_serve:
            serve.start(http_options={"host": "127.0.0.1", "port": serve_cfg.http.port})
        t0 = time.perf_counter()
        prefix = f"/{serve_cfg.http.app_name}"
        serve.run(build_app(ServeAppArgs(config=serve_cfg.model_dump(mode="json"))), name=serve_cfg.http.app_name,
                  route_prefix=prefix, blocking=False)
        self.url = f"http://127.0.0.1:{serve_cfg.http.port}{prefix}"
        wait_ready(self.url)
        # no retries: a retried request's latency would be measured as one answer's
        self.client = RagtuneClient(self.url, timeout=120.0, max_retries=0)
        log.info("serving app ready at %s in %.1fs", self.url, time.perf_counter() - t0)

    def reload(self) -> dict[str, Any]:
        """Switch to the index version LATEST names now (every shard group loads it first)."""
        return self.client.reload(timeout=300)

    def stop(self) -> None:
        from ray import serve

        self.client.close()
        serve.delete(self.cfg.http.app_name)
        if self.started_serve:
            serve.shutdown()


def _serve_running() -> bool:
    """Whether this Ray cluster already runs a Serve instance (whose proxy owns the HTTP port)."""
    from ray.serve.context import _get_global_client
    from ray.serve.exceptions import RayServeException

    try:
        _get_global_client()
    except RayServeException:
        return False
    return True


# --- 6. the update ---------------------------------------------------------------------------------------------------

def update_systems(cfg: CompareJobConfig, app: App, qs: Questions, docs: Sequence[Mapping[str, Any]], base: str,
                   val: str, cluster: Cluster) -> UpdateOutcome:
    """Before/after accuracy on the affected questions and each system's time-to-knowledge."""
    k = cfg.retrieval.k
    qas = qs.update_eval
    corpus = cfg.update.corpus
    assert corpus is not None  # the schema takes update.corpus and update.questions together
    before = {name: score(qas, ask_system(app.client, name, qas, cfg), k if SYSTEM_MODELS[name][1] else None)
              for name in cfg.systems}
    update: dict[str, Update] = {}

    # RAG and RAFT: the new documents are embedded and added to the index, the app switches versions
    t0 = time.perf_counter()
    added = freshness.add(_join(cfg.output.path, "index"), corpus=corpus)
    reload = app.reload()
    served_s = time.perf_counter() - t0
    index_add = IndexAddStage(seconds=served_s, add=asdict(added), reload=reload)
    for name in ("rag", "raft"):
        if name in cfg.systems:
            first = ask_system(app.client, name, qas[:1], cfg)[0]  # the first answer from the new version
            answers = ask_system(app.client, name, qas, cfg)
            update[name] = Update(before=before[name], after=score(qas, answers, k), how="index add + reload",
                                  time_to_knowledge_s=served_s + first.seconds)

    # fine-tuned: retrained on the seen and the new facts (from the base, as a new run), then asked
    if "finetuned" in cfg.systems:
        t0 = time.perf_counter()
        upd_docs = read_corpus_records(cfg, corpus) if cfg.finetune.data != "qa" else []
        records = finetune_records(cfg, [*qs.seen, *qs.update], [*docs, *upd_docs])
        path = write_jsonl(Path(cfg.output.path) / "data" / "finetuned-update.jsonl", records)
        ft = finetune.run(finetune_config(cfg, "finetuned-update", base, path, val))
        ask_all(app.client, "finetuned-update", False, qas[:1], cfg)  # the new adapter loads on first use
        ttk = time.perf_counter() - t0
        answers = ask_all(app.client, "finetuned-update", False, qas, cfg)
        cost = _training_seconds(ft.seconds, cfg, cluster)
        update["finetuned"] = Update(before=before["finetuned"], after=score(qas, answers, None), how="retraining",
                                     time_to_knowledge_s=ttk,
                                     retrain=Retrain(seconds=ft.seconds, records=len(records),
                                                     cpu_seconds=cost.cpu_seconds, gpu_seconds=cost.gpu_seconds))
    if "base" in cfg.systems:
        update["base"] = Update(before=before["base"], after=before["base"])  # closed-book: it learns nothing
    return UpdateOutcome(index_add, {name: update[name] for name in cfg.systems})


# --- 7. the report ---------------------------------------------------------------------------------------------------

def assemble(cfg: CompareJobConfig, qs: Questions, stages: Stages, measured: Mapping[str, Measured],
             update: UpdateOutcome | None, t_start: float) -> CompareResults:
    """The results of the run, each system with its update and the table's qualitative columns."""
    updates = update.systems if update else {}
    retrain = updates["finetuned"].retrain if "finetuned" in updates else None
    text = describe(cfg, stages, len(qs.seen), retrain)
    systems = {name: SystemResult(seen=m.seen, held_out=m.held_out, latency=m.latency, examples=m.examples,
                                  update=updates.get(name), data_needed=text[name][0], cost_text=text[name][1],
                                  maintenance=text[name][2])
               for name, m in measured.items()}
    return CompareResults(config=cfg.model_dump(mode="json"),
                          questions=QuestionCounts(total=len(qs.all), seen=len(qs.seen), held_out=len(qs.held),
                                                   update=len(qs.update)),
                          stages=stages, systems=systems, seconds=time.perf_counter() - t_start)


def write_report(cfg: CompareJobConfig, results: CompareResults) -> CompareSummary:
    """``report.md``, ``report.html``, ``results.json`` and ``comparison.png`` into ``output.path``; the table's
    numbers printed for a terminal, with where the whole report is."""
    report = render_table(results.systems)
    root = resolve(cfg.output.path)
    chart = plot(results.systems)
    atomic_write_bytes(root.join("report.md"), (report + "\n").encode())
    atomic_write_bytes(root.join("results.json"), results.to_json().encode())
    atomic_write_bytes(root.join("comparison.png"), chart)
    atomic_write_bytes(root.join("report.html"), render_html(results, chart).encode())
    console.out(f"\n{render_terminal(results.systems)}\n\nthe whole table: {root.join('report.md').shown}\n"
                f"as a page (opens in a browser, no server): {root.join('report.html').shown}")
    summary = {name: {"seen_em": s.seen.em, "held_out_em": s.held_out.em,
                      "new_em": s.update.after.em if s.update else None,
                      "time_to_knowledge_s": s.update.time_to_knowledge_s if s.update else None}
               for name, s in results.systems.items()}
    return CompareSummary(cfg.output.path, root.join("report.md").shown, summary, results.seconds)


# --- the sub-jobs' configs, the output folder, the base model ------------------------------------------------------

def embed_config(cfg: CompareJobConfig) -> EmbedJobConfig:
    # overwrite: every comparison embeds afresh (prepare_output), whatever an earlier one left there
    return EmbedJobConfig(corpus=cfg.corpus, chunk=cfg.chunk, embed=cfg.embed,
                          output={"path": _join(cfg.output.path, "embeddings"), "overwrite": True}, cluster=cfg.cluster)


def index_config(cfg: CompareJobConfig) -> IndexJobConfig:
    return IndexJobConfig(embeddings={"path": _join(cfg.output.path, "embeddings")},
                          index={"path": _join(cfg.output.path, "index"), "kind": cfg.index.kind,
                                 "shards": cfg.index.shards, "lexical": cfg.index.lexical.model_dump()},
                          cluster=cfg.cluster)


def finetune_config(cfg: CompareJobConfig, name: str, base: str, train: str, validation: str,
                    train_cfg: TrainConfig | None = None) -> FinetuneJobConfig:
    f = cfg.finetune
    return FinetuneJobConfig(
        model={"name": base}, data={"train": train, "validation": validation, "max_length": f.max_length},
        lora=f.lora, train=train_cfg or f.train, deepspeed=f.deepspeed, scaling=f.scaling,
        run={"name": name, "storage_path": _join(cfg.output.path, "runs")}, cluster=cfg.cluster)


def adapter_path(cfg: CompareJobConfig, run_name: str) -> str:
    return _join(cfg.output.path, "runs", run_name, "outputs", "adapter")


def adapters(cfg: CompareJobConfig, update: bool) -> dict[str, str]:
    """The adapters the serving app loads: each trained system's, and the retrained one of the update."""
    out = {}
    if "finetuned" in cfg.systems:
        out["finetuned"] = adapter_path(cfg, "finetuned")
        if update:
            out["finetuned-update"] = adapter_path(cfg, "finetuned-update")
    if "raft" in cfg.systems:
        out["raft"] = adapter_path(cfg, "raft")
    return out


def serve_config(cfg: CompareJobConfig, base: str, adapters: Mapping[str, str]) -> ServeJobConfig:
    """The serving app the systems are asked through: the index, the base and its adapters, on 127.0.0.1.

    Its deployments reserve little CPU (``num_cpus``), so that the retraining of the update stage can place its
    workers beside an idle app on a small cluster; threads, not reservations, do the work.
    """
    a = cfg.answer
    return ServeJobConfig.model_validate({
        "index": {"path": _join(cfg.output.path, "index"), "poll_interval_s": None},
        "embedder": {"num_cpus": 0.1, "threads": 1},
        "shards": {"num_cpus": 0.05, "threads": 1},
        "retrieval": {"k": cfg.retrieval.k, "mode": cfg.retrieval.mode},
        "generator": {"model": base, "name": "base", "adapters": dict(adapters), "defaults": a.defaults.model_dump(),
                      "num_cpus": 0.2, "max_batch_size": max(8, a.concurrency)},
        "prompt": cfg.prompt.model_dump(),
        "http": {"port": a.port, "app_name": "ragtune-compare"},
        "auth": {"api_keys_env": None},
        "limits": {"max_k": max(50, cfg.retrieval.k)},
        "serve": {"access_log": False},
        "cluster": cfg.cluster.model_dump(),
    })


def _join(root: str, *names: str) -> str:
    return str(Path(root, *names))


OWN_OUTPUTS = ("embeddings", "index", "runs", "data", "base_model", "report.md", "report.html", "results.json",
               "comparison.png")


def prepare_output(cfg: CompareJobConfig) -> None:
    """Every run measures from scratch: what an earlier comparison wrote into ``output.path`` (embeddings, index,
    training runs, records, report) is removed first, so no stage reuses work, or reports its time, from another
    run. (Within a run, the training jobs still survive worker failures from their checkpoints.)"""
    out = Path(cfg.output.path)
    old = [out / name for name in OWN_OUTPUTS if (out / name).exists()]
    if old:
        log.info("%s holds an earlier comparison: removing its %s", out, ", ".join(p.name for p in old))
    for p in old:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def build_base(cfg: CompareJobConfig, docs: Sequence[Mapping[str, Any]], qas: Sequence[QA]) -> str:
    """The base generator's folder: ``model.name``, or the tiny preset built once (a tokenizer trained on the
    corpus and the questions, random weights) so that every adapter shares one base."""
    if cfg.model.name != "tiny":
        return absolute_model_name(cfg.model.name)  # absolute, as the output folder (run())

    t = cfg.model.tiny
    texts = [f"{d.get('title') or ''} {d['text']}" for d in docs] + [f"{q.question} {q.answers[0]}" for q in qas]
    spec = TinySpec(layers=t.layers, hidden=t.hidden, heads=t.heads, intermediate=4 * t.hidden, vocab=t.vocab,
                    seed=cfg.finetune.train.seed)
    return str(build_tiny(Path(cfg.output.path) / "base_model", texts, spec))


def read_corpus_records(cfg: CompareJobConfig, paths: str | list[str]) -> list[dict[str, Any]]:
    """The corpus' documents as {id, title, text} (for the tiny base's tokenizer and corpus fine-tuning)."""
    c = cfg.corpus
    listing = list_corpus(paths)
    out = []
    for f in listing.files:
        if f.kind == "jsonl":
            with listing.fs.open_input_stream(f.path) as s:
                rows = [json.loads(line) for line in s.read().decode().splitlines() if line.strip()]
        elif f.kind == "parquet":
            rows = pq.read_table(f.path, filesystem=listing.fs).to_pylist()
        else:
            continue
        out += [{"id": r.get(c.id_field), "title": r.get(c.title_field), "text": r.get(c.text_field)} for r in rows]
    return out


# --- cost ------------------------------------------------------------------------------------------------------------

def _cluster_resources() -> Cluster:
    import ray

    res = ray.cluster_resources()
    return Cluster(cpus=float(res.get("CPU", 0)), gpus=float(res.get("GPU", 0)))


def _resource_seconds(seconds: float, cluster: Cluster) -> Cost:
    """Wall seconds x the cluster's CPUs (GPUs): what a stage that may use the whole cluster costs at most."""
    return Cost(cpu_seconds=seconds * cluster.cpus if cluster.cpus else None,
                gpu_seconds=seconds * cluster.gpus if cluster.gpus else None)


def _training_seconds(seconds: float, cfg: CompareJobConfig, cluster: Cluster) -> Cost:
    """Wall seconds x the resources the training workers reserve."""
    s = cfg.finetune.scaling
    if cluster.gpus > 0 and s.use_gpu in (True, "auto"):
        return Cost(gpu_seconds=seconds * s.num_workers)
    return Cost(cpu_seconds=seconds * s.num_workers * s.cpus_per_worker)


if __name__ == "__main__":  # python -m jobs.compare --config FILE [overrides] (what `ray job submit` calls)
    job_main("compare", run)
