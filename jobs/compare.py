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
7. the report: ``report.md`` (a table shaped like the comparison people decide with), ``results.json`` (every
   number), ``comparison.png``.

What is measured is what is served: answers come from the serving app's own prompt assembly and generation
(``serving.rag``), and RAFT's training prompts are built by the same functions.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from configs.errors import InvalidRequest, RagtuneError
from configs.schema.compare import SYSTEMS, CompareJobConfig, RaftConfig
from configs.schema.serve import PromptConfig
from jobs.commands import job_main

log = logging.getLogger("ragtune.compare")

# How each system is asked: (the model it is served as, whether it retrieves).
SYSTEM_MODELS = {"base": ("base", False), "finetuned": ("finetuned", False), "rag": ("base", True),
                 "raft": ("raft", True)}
LABELS = {"base": "base model", "finetuned": "fine-tuned (LoRA)", "rag": "RAG", "raft": "RAFT (fine-tuned + RAG)"}


# --- 1. questions and splits ----------------------------------------------------------------------------------------

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
    from models.sft import is_validation

    seen, held = [], []
    for q in qas:
        (held if is_validation(q.doc_id or q.id, 1 - finetune_fraction, seed) else seen).append(q)
    return seen, held


def sample(qas: Sequence[QA], n: int | None, seed: int) -> list[QA]:
    """At most ``n`` questions, a seeded sample in file order."""
    if n is None or len(qas) <= n:
        return list(qas)
    keep = set(random.Random(seed).sample(range(len(qas)), n))
    return [q for i, q in enumerate(qas) if i in keep]


# --- 3/4. training records ----------------------------------------------------------------------------------------

def qa_records(qas: Sequence[QA]) -> list[dict[str, Any]]:
    """Closed-book chat records: the question as the user turn, the first reference answer as the assistant's."""
    return [{"id": q.id, "messages": [{"role": "user", "content": q.question},
                                      {"role": "assistant", "content": q.answers[0]}]} for q in qas]


def corpus_records(docs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The corpus as chat records (the title asked, the text answered): the loss falls on the document text."""
    return [{"id": f"doc:{d['id']}", "messages": [{"role": "user", "content": str(d.get("title") or d["id"])},
                                                  {"role": "assistant", "content": str(d["text"])}]}
            for d in docs if d.get("text")]


def raft_records(qas: Sequence[QA], retrieved: Mapping[str, Sequence[Mapping[str, Any]]],
                 gold: Mapping[str, Mapping[str, Any] | None], cfg: RaftConfig, prompt: PromptConfig,
                 seed: int, k: int, fit: PassageFit | None = None) -> list[dict[str, Any]]:
    """RAFT records (Zhang et al. 2024): a question, ``k`` passages as retrieval would give them, its answer, in
    the serving app's own prompt.

    In ``cfg.gold_fraction`` of the records the passages are the gold one and ``k - 1`` hard distractors (or
    ``cfg.distractors``); in the others only distractors, one more: there the answer must come from what the
    model learned, not from the prompt (the paper's P% / (1 - P)% split).

    Args:
        qas: the seen questions.
        retrieved: per question id, passages retrieved from the real index, best first (``doc_id``, ``title``,
            ``text``); the hard distractors are the best of these from other documents.
        gold: per question id, the gold passage (a chunk of its ``doc_id``), or None when it is not indexed.
        cfg: ``gold_fraction`` and ``distractors``.
        prompt: the serving app's prompt config (passages numbered, system message, question).
        seed: the gold draw and the passages' order.
        k: the passages retrieval puts into a prompt (``retrieval.k``).
        fit: cuts a record's passages to what fits the training length, as the serving app cuts them to the
            model's context (:func:`passage_fit`); None keeps them whole.

    Returns:
        Chat records; ``raft`` says whether the gold passage is in it (after fitting) and which distractors are.
    """
    from models.prompt import rag_messages

    n = cfg.distractors if cfg.distractors is not None else k - 1
    rng = random.Random(seed)
    out = []
    for q in qas:
        g = gold.get(q.id)
        with_gold = g is not None and rng.random() < cfg.gold_fraction
        others = [p for p in retrieved.get(q.id, ()) if p.get("doc_id") != q.doc_id]
        distractors = others[:n if with_gold else n + 1]
        passages = [dict(p) for p in distractors] + ([dict(g)] if with_gold and g is not None else [])
        rng.shuffle(passages)
        if fit is not None:
            passages = fit(q.question, passages, q.answers[0])
        messages = rag_messages([{"role": "user", "content": q.question}], passages, prompt)
        kept = {p.get("doc_id") for p in passages}
        out.append({"id": q.id, "messages": [*messages, {"role": "assistant", "content": q.answers[0]}],
                    "raft": {"gold": with_gold and q.doc_id in kept,
                             "distractors": [p.get("doc_id") for p in distractors if p.get("doc_id") in kept]}})
    return out


PassageFit = Callable[[str, list[dict[str, Any]], str], list[dict[str, Any]]]


def passage_fit(base: str, prompt: PromptConfig, max_length: int) -> PassageFit:
    """Fit a RAFT record's passages into ``max_length`` tokens (``finetune.max_length``) with the serving app's
    own rule (:func:`serving.rag.build_prompt`: the last passage is cut by tokens, or dropped when too little of
    it would remain), leaving room for the answer, so that no record loses its answer to truncation."""
    from models.generators import load_tokenizer
    from models.prompt import build_prompt

    tok = load_tokenizer(base)

    def fit(question: str, passages: list[dict[str, Any]], answer: str) -> list[dict[str, Any]]:
        room = len(tok(answer, add_special_tokens=False)["input_ids"]) + 8  # the answer, the template's end
        try:
            p = build_prompt(tok, [{"role": "user", "content": question}], passages, prompt, max_length, room)
        except InvalidRequest:
            raise RagtuneError(f"finetune.max_length = {max_length}: the question {question[:60]!r} and its answer "
                               "do not fit even without passages. Fix: raise finetune.max_length") from None
        return [{k: v for k, v in x.items() if k != "n"} for x in p.passages]

    return fit


def replay_records(path: str, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` records of a JSONL file of chat records, a seeded sample (all of them when there are fewer)."""
    p = Path(path)
    if not p.is_file():
        raise RagtuneError(f"raft.replay = {path!r}: no such file. Fix: give a JSONL file of chat records "
                           "(`messages`), or null")
    rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(seed)
    picked = rows if len(rows) <= n else [rows[i] for i in sorted(rng.sample(range(len(rows)), n))]
    return [{"id": f"replay:{r.get('id', i)}", "messages": r["messages"]} for i, r in enumerate(picked)]


def write_jsonl(path: Path, records: Sequence[Mapping[str, Any]]) -> str:
    """Write records as JSONL atomically (a rerun never sees half a file); returns the path."""
    from sharding.storage import atomic_write_bytes, resolve

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(resolve(str(path)), "".join(json.dumps(r) + "\n" for r in records).encode())
    return str(path)


# --- 5. answering over HTTP ------------------------------------------------------------------------------------------

@dataclass
class Answer:
    id: str
    text: str
    seconds: float
    citations: list[str] = field(default_factory=list)  # doc ids of the passages in the prompt, in rank order
    error: str | None = None


def ask_all(url: str, model: str, retrieval: bool, qas: Sequence[QA], *, k: int, mode: str, concurrency: int,
            max_tokens: int, timeout_s: float = 120.0) -> list[Answer]:
    """Ask the serving app every question as served ``model`` (the OpenAI chat API with ragtune's ``retrieval``
    field: off, or on with ``k`` passages in ``mode``), ``concurrency`` requests in flight; per answer its text,
    latency and cited documents."""
    import requests

    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=concurrency))

    def one(q: QA) -> Answer:
        body = {"model": model, "messages": [{"role": "user", "content": q.question}], "max_tokens": max_tokens,
                "temperature": 0.0, "retrieval": {"k": k, "mode": mode} if retrieval else False}
        t0 = time.perf_counter()
        try:
            r = session.post(f"{url}/v1/chat/completions", json=body, timeout=timeout_s)
            dt = time.perf_counter() - t0
            data = r.json()
        except (requests.RequestException, ValueError) as e:
            return Answer(q.id, "", time.perf_counter() - t0, error=f"{type(e).__name__}: {e}")
        if r.status_code != 200:
            return Answer(q.id, "", dt, error=f"HTTP {r.status_code}: {data.get('error', {}).get('message', data)}")
        return Answer(q.id, data["choices"][0]["message"]["content"] or "", dt,
                      [c.get("doc_id") for c in data.get("citations") or []])

    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(one, qas))
    failed = [a for a in answers if a.error]
    if failed:
        log.warning("%d of %d requests to %s failed, e.g. %s", len(failed), len(answers), model, failed[0].error)
    return answers


def ask_system(url: str, system: str, qas: Sequence[QA], **kw: Any) -> list[Answer]:
    model, retrieval = SYSTEM_MODELS[system]
    return ask_all(url, model, retrieval, qas, **kw)


def score(qas: Sequence[QA], answers: Sequence[Answer], k: int | None) -> dict[str, Any]:
    """EM and F1 (SQuAD), gold-document recall@k of the cited passages (when ``k``), latency p50/p95."""
    from sharding.metrics import exact_match, token_f1

    by_id = {a.id: a for a in answers}
    em = [exact_match(by_id[q.id].text, q.answers) for q in qas]
    f1 = [token_f1(by_id[q.id].text, q.answers) for q in qas]
    lat = sorted(by_id[q.id].seconds for q in qas)
    out: dict[str, Any] = {"n": len(qas), "em": _mean(em), "f1": _mean(f1),
                           "errors": sum(1 for q in qas if by_id[q.id].error),
                           "latency_p50_s": _pct(lat, 50), "latency_p95_s": _pct(lat, 95)}
    gold = [q for q in qas if q.doc_id is not None]
    if k is not None and gold:
        out["recall_at_k"] = _mean([float(q.doc_id in by_id[q.id].citations[:k]) for q in gold])
    return out


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0


def _pct(sorted_xs: Sequence[float], p: float) -> float | None:
    if not sorted_xs:
        return None
    i = min(len(sorted_xs) - 1, max(0, round(p / 100 * (len(sorted_xs) - 1))))
    return float(sorted_xs[i])


def examples(qas: Sequence[QA], answers: Sequence[Answer], n: int = 3) -> list[dict[str, Any]]:
    by_id = {a.id: a for a in answers}
    return [{"question": q.question, "answers": list(q.answers), "said": by_id[q.id].text} for q in qas[:n]]


# --- 7. the report ---------------------------------------------------------------------------------------------------

def _cell(m: Mapping[str, Any] | None, key: str = "em") -> str:
    if not m:
        return "-"
    return f"{m[key]:.0%}" if key in ("em", "recall_at_k") else f"{m[key]:.2f}"


def render_table(results: Mapping[str, Any]) -> str:
    """The comparison as Markdown: one row per system, the columns people decide with."""
    rows = ["| approach | data it needs | seen facts EM / F1 | held-out facts EM / F1 | new knowledge EM "
            "(after update) | time-to-knowledge | gold passage recall@k | latency p50 / p95 | compute to build | "
            "maintenance |", "|" + "---|" * 10]
    for name in SYSTEMS:
        s = results["systems"].get(name)
        if s is None:
            continue
        seen, held, new = s.get("seen"), s.get("held_out"), s.get("update") or {}
        after = new.get("after")
        ttk = new.get("time_to_knowledge_s")
        ttk_text = "never (closed-book, not retrained)" if name == "base" and new else (
            f"{_seconds(ttk)} ({new['how']})" if ttk is not None else "-")
        recall = "-" if not seen or "recall_at_k" not in seen else \
            f"{seen['recall_at_k']:.0%} / {held['recall_at_k']:.0%}" if held and "recall_at_k" in held else \
            f"{seen['recall_at_k']:.0%}"
        lat = s.get("latency") or {}
        lat_text = f"{lat['p50_s'] * 1000:.0f} / {lat['p95_s'] * 1000:.0f} ms" if lat.get("p50_s") is not None \
            else "-"
        before = f" (before: {_cell(new.get('before'))})" if new else ""
        rows.append(f"| {LABELS[name]} | {s['data_needed']} | "
                    f"{_cell(seen)} / {_cell(seen, 'f1')} | {_cell(held)} / {_cell(held, 'f1')} | "
                    f"{_cell(after)}{before} | "
                    f"{ttk_text} | {recall} | {lat_text} | {s['cost_text']} | {s['maintenance']} |")
    return "\n".join(rows)


def plot(results: Mapping[str, Any]) -> bytes:
    """Bars of EM per system on seen, held-out and new knowledge; time-to-knowledge beside (PNG bytes)."""
    from jobs.plots import png, pyplot

    plt = pyplot()

    names = [n for n in SYSTEMS if n in results["systems"]]
    groups = [("seen", "seen facts"), ("held_out", "held-out facts"), ("after", "new knowledge (after update)")]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 1.3]})
    width = 0.8 / len(groups)
    for j, (key, label) in enumerate(groups):
        vals = []
        for n in names:
            s = results["systems"][n]
            m = (s.get("update") or {}).get("after") if key == "after" else s.get(key)
            vals.append(100 * m["em"] if m else 0.0)
        ax.bar([i + (j - 1) * width for i in range(len(names))], vals, width, label=label)
    ax.set_xticks(range(len(names)), [LABELS[n] for n in names], fontsize=8)
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 118)  # headroom for the legend above the bars
    ax.legend(fontsize=8, loc="upper center", ncol=len(groups), frameon=False)
    ax.set_title("answers: what each system knows", fontsize=10)
    ttk = [(LABELS[n], (results["systems"][n].get("update") or {}).get("time_to_knowledge_s")) for n in names]
    ttk = [(label, v) for label, v in ttk if v is not None]
    if ttk:
        ax2.barh([label for label, _ in ttk], [v for _, v in ttk], color="tab:gray")
        ax2.set_xscale("log")  # seconds for an index add, minutes or hours for retraining
        ax2.set_xlim(right=max(v for _, v in ttk) * 8)
        for i, (_, v) in enumerate(ttk):
            ax2.annotate(_seconds(v), (v, i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
        ax2.set_xlabel("seconds until it answers from new documents", fontsize=8)
        ax2.set_title("time-to-knowledge (log scale)", fontsize=10)
        ax2.tick_params(axis="y", labelsize=8)
    else:
        ax2.axis("off")
    fig.tight_layout()
    return png(fig, dpi=110)


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


def check(cfg: CompareJobConfig) -> list[QA]:
    """What can fail before any work, without Ray or torch: the questions, the update, the sub-jobs' inputs."""
    from jobs.embed import check as check_embed

    qas = read_questions(cfg.questions.path)
    if cfg.update.questions:
        read_questions(cfg.update.questions, "update.questions")
    if "://" in cfg.output.path:
        raise RagtuneError(f"output.path = {cfg.output.path!r}: the comparison writes its training records and "
                           "report with local file access. Fix: give a local folder, or on a cluster a mount every "
                           "node shares (e.g. /mnt/shared/compare)")
    check_embed(embed_config(cfg))
    if cfg.model.name.startswith((".", "/", "~")) and not Path(cfg.model.name).expanduser().exists():
        raise RagtuneError(f"model.name = {cfg.model.name!r}: no such folder. Fix: give a local folder of a "
                           "transformers causal LM, a hub id in the local cache, or tiny")
    seen, held = split_questions(qas, cfg.questions.finetune_fraction, cfg.questions.seed)
    if not seen or not held:
        raise RagtuneError(f"questions.finetune_fraction = {cfg.questions.finetune_fraction} leaves "
                           f"{len(seen)} seen and {len(held)} held-out questions of {len(qas)}: both are needed. "
                           "Fix: more questions (or documents), or a fraction nearer 0.5")
    return qas


def embed_config(cfg: CompareJobConfig) -> Any:
    from configs.schema import EmbedJobConfig

    # overwrite: every comparison embeds afresh (prepare_output), whatever an earlier one left there
    return EmbedJobConfig(corpus=cfg.corpus, chunk=cfg.chunk, embed=cfg.embed,
                          output={"path": _join(cfg.output.path, "embeddings"), "overwrite": True}, cluster=cfg.cluster)


def index_config(cfg: CompareJobConfig) -> Any:
    from configs.schema import IndexJobConfig

    return IndexJobConfig(embeddings={"path": _join(cfg.output.path, "embeddings")},
                          index={"path": _join(cfg.output.path, "index"), "kind": cfg.index.kind,
                                 "shards": cfg.index.shards, "lexical": cfg.index.lexical.model_dump()},
                          cluster=cfg.cluster)


def finetune_config(cfg: CompareJobConfig, name: str, base: str, train: str, validation: str,
                    train_cfg: Any = None) -> Any:
    from configs.schema import FinetuneJobConfig

    f = cfg.finetune
    return FinetuneJobConfig(
        model={"name": base}, data={"train": train, "validation": validation, "max_length": f.max_length},
        lora=f.lora, train=train_cfg or f.train, deepspeed=f.deepspeed, scaling=f.scaling,
        run={"name": name, "storage_path": _join(cfg.output.path, "runs")}, cluster=cfg.cluster)


def adapter_path(cfg: CompareJobConfig, run_name: str) -> str:
    return _join(cfg.output.path, "runs", run_name, "outputs", "adapter")


def serve_config(cfg: CompareJobConfig, base: str, adapters: Mapping[str, str]) -> Any:
    """The serving app the systems are asked through: the index, the base and its adapters, on 127.0.0.1.

    Its deployments reserve little CPU (``num_cpus``), so that the retraining of the update stage can place its
    workers beside an idle app on a small cluster; threads, not reservations, do the work.
    """
    from configs.schema import ServeJobConfig

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


OWN_OUTPUTS = ("embeddings", "index", "runs", "data", "base_model", "report.md", "results.json", "comparison.png")


def prepare_output(cfg: CompareJobConfig) -> None:
    """Every run measures from scratch: what an earlier comparison wrote into ``output.path`` (embeddings, index,
    training runs, records, report) is removed first, so no stage reuses work, or reports its time, from another
    run. (Within a run, the training jobs still survive worker failures from their checkpoints.)"""
    import shutil

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
    from models.generators import TinySpec, absolute_model_name, build_tiny

    if cfg.model.name != "tiny":
        return absolute_model_name(cfg.model.name)  # absolute, as the output folder (run())

    t = cfg.model.tiny
    texts = [f"{d.get('title') or ''} {d['text']}" for d in docs] + [f"{q.question} {q.answers[0]}" for q in qas]
    spec = TinySpec(layers=t.layers, hidden=t.hidden, heads=t.heads, intermediate=4 * t.hidden, vocab=t.vocab,
                    seed=cfg.finetune.train.seed)
    return str(build_tiny(Path(cfg.output.path) / "base_model", texts, spec))


def read_corpus_records(cfg: CompareJobConfig, paths: str | list[str]) -> list[dict[str, Any]]:
    """The corpus' documents as {id, title, text} (for the tiny base's tokenizer and corpus fine-tuning)."""
    import pyarrow.parquet as pq

    from sharding.corpus import list_corpus

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


def gold_and_retrieved(index_path: str, qas: Sequence[QA], cfg: CompareJobConfig) -> tuple[dict, dict]:
    """Per question, the passages the real index retrieves (``raft.candidates``, best first) and its gold passage
    (the best-ranked chunk of its document; searched for with a doc_id filter when not among the candidates)."""
    from serving.rag import LocalRetriever

    retriever = LocalRetriever(index_path, mode=cfg.retrieval.mode)
    retrieved, gold = {}, {}
    for q in qas:
        hits = retriever.search(q.question, cfg.raft.candidates)
        retrieved[q.id] = hits
        g = next((h for h in hits if q.doc_id is not None and h.get("doc_id") == q.doc_id), None)
        if g is None and q.doc_id is not None:
            found = retriever.search(q.question, 1, {"doc_id": q.doc_id})
            g = found[0] if found else None
        gold[q.id] = g
    return retrieved, gold


class App:
    """The serving app of the comparison in this process's Ray, at ``http://127.0.0.1:<answer.port>/<app name>``.

    A Ray that already runs Serve keeps its instance (and its HTTP port, which ``answer.port`` must then name);
    otherwise Serve is started here and shut down again by :meth:`stop`.
    """

    def __init__(self, serve_cfg: Any):
        from ray import serve

        from jobs.serve import wait_ready
        from serving.app import ServeAppArgs, build_app

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
        log.info("serving app ready at %s in %.1fs", self.url, time.perf_counter() - t0)

    def reload(self) -> dict[str, Any]:
        import requests

        r = requests.post(f"{self.url}/admin/reload", timeout=300)
        if r.status_code != 200:
            raise RagtuneError(f"{self.url}/admin/reload answered {r.status_code}: {r.text[:300]}")
        return r.json()

    def stop(self) -> None:
        from ray import serve

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


def run(cfg: CompareJobConfig, on_stage: Callable[[str], None] | None = None) -> CompareSummary:
    """Build and measure every system of ``cfg.systems``; ``on_stage`` hears each stage's name (the demo's
    progress)."""
    t_start = time.perf_counter()
    qas = check(cfg)
    # absolute: the training workers and the serving replicas load models from it in their own working directories
    out_abs = str(Path(cfg.output.path).resolve())
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"path": out_abs})})
    stage = on_stage or (lambda name: log.info("== %s", name))
    q = cfg.questions
    seen, held = split_questions(qas, q.finetune_fraction, q.seed)
    seen_eval, held_eval = sample(seen, q.max_eval, q.seed), sample(held, q.max_eval, q.seed + 1)
    update_qas = read_questions(cfg.update.questions, "update.questions") if cfg.update.questions else []
    update_eval = sample(update_qas, q.max_eval, q.seed + 2)
    log.info("%d questions: %d seen (fine-tuned on), %d held out; answering %d + %d%s", len(qas), len(seen),
             len(held), len(seen_eval), len(held_eval), f" + {len(update_eval)} after the update" if update_qas
             else "")

    from cluster.runtime import init_ray
    from jobs import embed, finetune
    from jobs import index as index_job

    init_ray(cfg.cluster)
    prepare_output(cfg)
    out = Path(cfg.output.path)
    docs = read_corpus_records(cfg, cfg.corpus.path)
    base = build_base(cfg, docs, qas + update_qas)
    results: dict[str, Any] = {"config": cfg.model_dump(mode="json"), "questions": {
        "total": len(qas), "seen": len(seen), "held_out": len(held), "update": len(update_qas)}, "stages": {},
        "systems": {}}
    stages = results["stages"]
    cluster = _cluster_resources()

    # RAG's index
    stage("embed + index the corpus (RAG)")
    e = embed.run(embed_config(cfg))
    ix = index_job.run(index_config(cfg))
    index_path = _join(cfg.output.path, "index")
    stages["index"] = {"seconds": e.seconds + ix.seconds, "embed_s": e.seconds, "index_s": ix.seconds,
                       "docs": e.docs, "chunks": e.chunks, **_resource_seconds(e.seconds + ix.seconds, cluster)}

    # fine-tuned: closed-book on the seen facts
    val = write_jsonl(out / "data" / "validation.jsonl", qa_records(sample(seen, 64, q.seed + 3)))
    adapters: dict[str, str] = {}
    if "finetuned" in cfg.systems:
        stage("fine-tune on the seen question/answer pairs (LoRA, Ray Train + DeepSpeed)")
        records = _finetune_records(cfg, seen, docs)
        path = write_jsonl(out / "data" / "finetuned.jsonl", records)
        ft = finetune.run(finetune_config(cfg, "finetuned", base, path, val))
        stages["finetuned"] = {"seconds": ft.seconds, "records": len(records), "loss_first": ft.loss_first,
                               "loss_last": ft.loss_last, **_training_seconds(ft.seconds, cfg, cluster)}
        adapters["finetuned"] = adapter_path(cfg, "finetuned")
        if update_qas:
            adapters["finetuned-update"] = adapter_path(cfg, "finetuned-update")
    if "raft" in cfg.systems:
        stage("RAFT: fine-tune on the seen questions with retrieved passages (gold + hard distractors)")
        retrieved, gold = gold_and_retrieved(index_path, seen, cfg)
        records = raft_records(seen, retrieved, gold, cfg.raft, cfg.prompt, q.seed, cfg.retrieval.k,
                               passage_fit(base, cfg.prompt, cfg.finetune.max_length))
        replay = replay_records(cfg.raft.replay, round(cfg.raft.replay_ratio * len(records)), q.seed) \
            if cfg.raft.replay else []
        path = write_jsonl(out / "data" / "raft.jsonl", records + replay)
        rf = finetune.run(finetune_config(cfg, "raft", base, path, val, cfg.raft.train))
        stages["raft"] = {"seconds": rf.seconds, "records": len(records), "replay": len(replay),
                          "with_gold": sum(r["raft"]["gold"] for r in records),
                          "loss_first": rf.loss_first, "loss_last": rf.loss_last,
                          **_training_seconds(rf.seconds, cfg, cluster)}
        adapters["raft"] = adapter_path(cfg, "raft")

    stage("serve: the Ray Serve app (OpenAI-compatible API) answers every system's questions over HTTP")
    app = App(serve_config(cfg, base, adapters))
    try:
        k, mode, a = cfg.retrieval.k, cfg.retrieval.mode, cfg.answer
        ask = dict(k=k, mode=mode, concurrency=a.concurrency, max_tokens=a.defaults.max_tokens)
        answered: dict[str, dict[str, list[Answer]]] = {}
        for name in cfg.systems:
            retrieves = SYSTEM_MODELS[name][1]
            answered[name] = {"seen": ask_system(app.url, name, seen_eval, **ask),
                              "held_out": ask_system(app.url, name, held_eval, **ask)}
            s = {split: score(qs, answered[name][split], k if retrieves else None)
                 for split, qs in (("seen", seen_eval), ("held_out", held_eval))}
            lat = sorted(x.seconds for split in answered[name].values() for x in split)
            results["systems"][name] = {**s, "latency": {"p50_s": _pct(lat, 50), "p95_s": _pct(lat, 95)},
                                        "examples": examples(held_eval, answered[name]["held_out"])}
            log.info("%s: seen EM %.0f%%, held-out EM %.0f%%", name, 100 * s["seen"]["em"], 100 * s["held_out"]["em"])

        if update_qas:
            stage("update: new and changed documents arrive; time-to-knowledge of each system")
            _update_stage(cfg, app, results, seen, update_qas, update_eval, docs, base, val, index_path, cluster,
                          ask)
    finally:
        app.stop()

    _describe(cfg, results, seen, docs)
    results["seconds"] = time.perf_counter() - t_start
    report = render_table(results)
    from sharding.storage import atomic_write_bytes, resolve

    root = resolve(cfg.output.path)
    atomic_write_bytes(root.join("report.md"), (report + "\n").encode())
    atomic_write_bytes(root.join("results.json"), json.dumps(results, indent=2, default=str).encode())
    atomic_write_bytes(root.join("comparison.png"), plot(results))
    print(report)
    summary = {name: {"seen_em": s["seen"]["em"], "held_out_em": s["held_out"]["em"],
                      "new_em": ((s.get("update") or {}).get("after") or {}).get("em"),
                      "time_to_knowledge_s": (s.get("update") or {}).get("time_to_knowledge_s")}
               for name, s in results["systems"].items()}
    return CompareSummary(cfg.output.path, root.join("report.md").uri, summary, results["seconds"])


def _finetune_records(cfg: CompareJobConfig, qas: Sequence[QA], docs: Sequence[Mapping[str, Any]]) -> list[dict]:
    kind = cfg.finetune.data
    return (qa_records(qas) if kind in ("qa", "both") else []) + (corpus_records(docs) if kind in ("corpus", "both")
                                                                  else [])


def _update_stage(cfg: CompareJobConfig, app: App, results: dict[str, Any], seen: Sequence[QA],
                  update_qas: Sequence[QA], update_eval: Sequence[QA], docs: Sequence[Mapping[str, Any]],
                  base: str, val: str, index_path: str,
                  cluster: dict[str, float], ask: dict[str, Any]) -> None:
    """Before/after accuracy on the affected questions and each system's time-to-knowledge."""
    from jobs import finetune, freshness

    k = cfg.retrieval.k
    before = {name: score(update_eval, ask_system(app.url, name, update_eval, **ask),
                          k if SYSTEM_MODELS[name][1] else None) for name in cfg.systems}
    update: dict[str, dict[str, Any]] = {name: {"before": before[name]} for name in cfg.systems}

    # RAG and RAFT: the new documents are embedded and added to the index, the app switches versions
    t0 = time.perf_counter()
    added = freshness.add(index_path, corpus=cfg.update.corpus)
    reload = app.reload()
    served_s = time.perf_counter() - t0
    results["stages"]["index_add"] = {"seconds": served_s, "add": asdict(added), "reload": reload}
    for name in ("rag", "raft"):
        if name in cfg.systems:
            first = ask_system(app.url, name, update_eval[:1], **ask)[0]  # the first answer from the new version
            answers = ask_system(app.url, name, update_eval, **ask)
            update[name].update(after=score(update_eval, answers, k), how="index add + reload",
                                time_to_knowledge_s=served_s + first.seconds)

    # fine-tuned: retrained on the seen and the new facts (from the base, as a new run), then asked
    if "finetuned" in cfg.systems:
        t0 = time.perf_counter()
        upd_docs = read_corpus_records(cfg, cfg.update.corpus) if cfg.finetune.data != "qa" else []
        records = _finetune_records(cfg, [*seen, *update_qas], list(docs) + upd_docs)
        path = write_jsonl(Path(cfg.output.path) / "data" / "finetuned-update.jsonl", records)
        ft = finetune.run(finetune_config(cfg, "finetuned-update", base, path, val))
        ask_all(app.url, "finetuned-update", False, update_eval[:1], **ask)  # the new adapter loads on first use
        ttk = time.perf_counter() - t0
        answers = ask_all(app.url, "finetuned-update", False, update_eval, **ask)
        update["finetuned"].update(after=score(update_eval, answers, None), how="retraining",
                                   time_to_knowledge_s=ttk,
                                   retrain={"seconds": ft.seconds, "records": len(records),
                                            **_training_seconds(ft.seconds, cfg, cluster)})
    if "base" in cfg.systems:
        update["base"]["after"] = update["base"]["before"]
    for name, u in update.items():
        results["systems"][name]["update"] = u


def _cluster_resources() -> dict[str, float]:
    import ray

    res = ray.cluster_resources()
    return {"CPU": float(res.get("CPU", 0)), "GPU": float(res.get("GPU", 0))}


def _resource_seconds(seconds: float, cluster: Mapping[str, float]) -> dict[str, float]:
    """Wall seconds x the cluster's CPUs (GPUs): what a stage that may use the whole cluster costs at most."""
    return {f"{r.lower()}_seconds": seconds * n for r, n in cluster.items() if n}


def _training_seconds(seconds: float, cfg: CompareJobConfig, cluster: Mapping[str, float]) -> dict[str, float]:
    """Wall seconds x the resources the training workers reserve."""
    s = cfg.finetune.scaling
    gpu = cluster.get("GPU", 0) > 0 and s.use_gpu in (True, "auto")
    if gpu:
        return {"gpu_seconds": seconds * s.num_workers}
    return {"cpu_seconds": seconds * s.num_workers * s.cpus_per_worker}


def _seconds(x: float) -> str:
    return f"{x:.1f} s" if x < 10 else f"{x:.0f} s"


def _cost(stage: Mapping[str, Any] | None) -> str:
    if not stage:
        return "-"
    used = ", ".join(f"{stage[k]:,.0f} {k.split('_')[0].upper()}-s" for k in ("cpu_seconds", "gpu_seconds")
                     if k in stage)
    return f"{_seconds(stage['seconds'])} ({used})" if used else _seconds(stage["seconds"])


def _describe(cfg: CompareJobConfig, results: dict[str, Any], seen: Sequence[QA],
              docs: Sequence[Mapping[str, Any]]) -> None:
    """The qualitative columns of the table: data needed, compute to build, maintenance."""
    st = results["stages"]
    ix = st.get("index", {})
    add = st.get("index_add", {})
    ft_upd = (results["systems"].get("finetuned", {}).get("update") or {}).get("retrain")
    n_qa = len(seen)
    text = {
        "base": ("nothing", "-", "none (knows nothing of the corpus)"),
        "finetuned": (f"{n_qa:,} Q/A pairs" + (" + the corpus text" if cfg.finetune.data != "qa" else ""),
                      _cost(st.get("finetuned")),
                      "retrain on every change" + (f" ({_seconds(ft_upd['seconds'])} here)" if ft_upd else "")),
        "rag": (f"the corpus ({ix.get('docs', len(docs)):,} docs, {ix.get('chunks', 0):,} chunks)", _cost(ix),
                "`ragtune index add` per change" + (f" ({_seconds(add['seconds'])} here)" if add else "")),
        "raft": (f"{n_qa:,} Q/A pairs + the corpus", f"{_cost(ix)} + {_cost(st.get('raft'))}",
                 "`index add` per change; retrain when the questions drift"),
    }
    for name, s in results["systems"].items():
        s["data_needed"], s["cost_text"], s["maintenance"] = text[name]


if __name__ == "__main__":  # python -m jobs.compare --config FILE [overrides] (what `ray job submit` calls)
    job_main("compare", run)
