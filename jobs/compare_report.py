"""The compare job's report: the Markdown table people decide with (``report.md``), its chart
(``comparison.png``), the same as one self-contained page (``report.html``), the table's numbers for a terminal,
and the table's qualitative columns (data needed, compute to build, maintenance)."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata

from configs.schema.compare import SYSTEMS, CompareJobConfig
from jobs.compare_results import (
    CompareResults,
    IndexStage,
    Retrain,
    Split,
    SplitScore,
    Stages,
    SystemResult,
    TrainStage,
)
from jobs.plots import png, pyplot

LABELS = {"base": "base model", "finetuned": "fine-tuned (LoRA)", "rag": "RAG", "raft": "RAFT (fine-tuned + RAG)"}


HEADER = ["approach", "data it needs", "seen facts EM / F1", "held-out facts EM / F1",
          "new knowledge EM (after update)", "time-to-knowledge", "gold passage recall@k", "latency p50 / p95",
          "compute to build", "maintenance"]


@dataclass(frozen=True)
class Claim:
    """A claim of the comparison, whether this run's numbers hold it, and the numbers (the demo checks them)."""

    text: str
    holds: bool
    evidence: str


def table_rows(systems: Mapping[str, SystemResult]) -> list[list[str]]:
    """The comparison's cells, one row per system in SYSTEMS order, the columns of ``HEADER``."""
    rows = []
    for name in SYSTEMS:
        s = systems.get(name)
        if s is None:
            continue
        seen, held, new = s.seen, s.held_out, s.update
        ttk = new.time_to_knowledge_s if new else None
        ttk_text = "never (closed-book, not retrained)" if name == "base" and new else (
            f"{seconds_text(ttk)} ({new.how})" if new and ttk is not None else "-")
        recall = "-" if seen.recall_at_k is None else \
            f"{seen.recall_at_k:.0%} / {held.recall_at_k:.0%}" if held.recall_at_k is not None else \
            f"{seen.recall_at_k:.0%}"
        lat = s.latency
        lat_text = f"{lat.p50_s * 1000:.0f} / {lat.p95_s * 1000:.0f} ms" if lat.p50_s is not None and \
            lat.p95_s is not None else "-"
        before = f" (before: {_cell(new.before)})" if new else ""
        rows.append([LABELS[name], s.data_needed, f"{_cell(seen)} / {_cell(seen, 'f1')}",
                     f"{_cell(held)} / {_cell(held, 'f1')}", f"{_cell(new.after if new else None)}{before}",
                     ttk_text, recall, lat_text, s.cost_text, s.maintenance])
    return rows


def render_table(systems: Mapping[str, SystemResult]) -> str:
    """The comparison as Markdown: one row per system, the columns people decide with."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(systems)]
    return "\n".join(lines)


def render_terminal(systems: Mapping[str, SystemResult]) -> str:
    """The table's numbers in a terminal of 80 columns: exact match per split, the update, time-to-knowledge and
    latency (the qualitative columns are in report.md and report.html)."""
    head = f"{'approach':<24}{'seen':>6}{'held-out':>10}{'new: before -> after':>22}{'to know':>10}{'p50':>8}"
    lines = [head, "-" * len(head)]
    for name in SYSTEMS:
        s = systems.get(name)
        if s is None:
            continue
        new = s.update
        update = f"{_cell(new.before)} -> {_cell(new.after)}" if new else "-"
        ttk = new.time_to_knowledge_s if new else None
        to_know = "never" if name == "base" and new else "-" if ttk is None else seconds_text(ttk)
        p50 = "-" if s.latency.p50_s is None else f"{s.latency.p50_s * 1000:.0f} ms"
        lines.append(f"{LABELS[name]:<24}{_cell(s.seen):>6}{_cell(s.held_out):>10}{update:>22}{to_know:>10}{p50:>8}")
    return "\n".join(lines)


def versions() -> dict[str, str]:
    """The versions of ragtune and the libraries that made the numbers (from the installed distributions)."""
    out = {}
    for dist in ("ragtune", "torch", "ray", "deepspeed", "transformers", "peft", "faiss-cpu", "faiss-gpu",
                 "sentence-transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def render_html(results: CompareResults, chart_png: bytes, claims: Sequence[Claim] = ()) -> str:
    """``report.html``: the table, the claims (the demo's), the chart inline, the settings and the versions, in
    one page that opens in a browser with no server and no network (no external stylesheet, script or image)."""
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in HEADER)
    body = "".join("<tr>" + "".join(f"<td>{e(c).replace('`', '')}</td>" for c in row) + "</tr>"
                   for row in table_rows(results.systems))
    claim_items = "".join(f'<li class="{"yes" if c.holds else "no"}"><b>{"holds" if c.holds else "does NOT hold"}'
                          f"</b>: {e(c.text)} <span>({e(c.evidence)})</span></li>" for c in claims)
    claims_html = f"<h2>What the comparison claims, and what this run measured</h2><ul>{claim_items}</ul>" \
        if claims else ""
    q = results.questions
    chart = base64.b64encode(chart_png).decode()
    vers = ", ".join(f"{k} {v}" for k, v in versions().items())
    settings = e(json.dumps(results.config, indent=2, default=str))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ragtune: fine-tuning vs RAG vs RAFT</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 75em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.5em; text-align: left; vertical-align: top; }}
th {{ background: #f3f3f3; }}
li.yes b {{ color: #1a7f37; }} li.no b {{ color: #cf222e; }} li span {{ color: #555; }}
img {{ max-width: 100%; }} pre {{ background: #f6f8fa; padding: 1em; overflow-x: auto; font-size: 0.85em; }}
</style></head><body>
<h1>Fine-tuning vs RAG vs RAFT on the same data</h1>
<p>{q.total:,} questions: {q.seen:,} about facts the trained systems learned (seen), {q.held_out:,} held out,
{q.update:,} about the update's new documents. The whole comparison took {seconds_text(results.seconds)}.</p>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
{claims_html}
<h2>Chart</h2><img alt="exact match per system and split; time-to-knowledge" src="data:image/png;base64,{chart}">
<h2>Settings</h2><details><summary>the resolved config</summary><pre>{settings}</pre></details>
<p>Versions: {e(vers)}.</p>
</body></html>
"""


def _cell(m: SplitScore | None, key: str = "em") -> str:
    if m is None:
        return "-"
    return f"{m.em:.0%}" if key == "em" else f"{m.f1:.2f}"


def plot(systems: Mapping[str, SystemResult]) -> bytes:
    """Bars of EM per system on seen, held-out and new knowledge; time-to-knowledge beside (PNG bytes)."""
    plt = pyplot()

    names = [n for n in SYSTEMS if n in systems]
    groups: list[tuple[Split, str]] = [("seen", "seen facts"), ("held_out", "held-out facts"),
                                       ("after", "new knowledge (after update)")]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 1.3]})
    width = 0.8 / len(groups)
    for j, (key, label) in enumerate(groups):
        vals = []
        for n in names:
            m = systems[n].score(key)
            vals.append(100 * m.em if m else 0.0)
        ax.bar([i + (j - 1) * width for i in range(len(names))], vals, width, label=label)
    ax.set_xticks(range(len(names)), [LABELS[n] for n in names], fontsize=8)
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 118)  # headroom for the legend above the bars
    ax.legend(fontsize=8, loc="upper center", ncol=len(groups), frameon=False)
    ax.set_title("answers: what each system knows", fontsize=10)
    ttk = [(LABELS[n], u.time_to_knowledge_s) for n in names if (u := systems[n].update) is not None
           and u.time_to_knowledge_s is not None]
    if ttk:
        ax2.barh([label for label, _ in ttk], [v for _, v in ttk], color="tab:gray")
        ax2.set_xscale("log")  # seconds for an index add, minutes or hours for retraining
        ax2.set_xlim(right=max(v for _, v in ttk) * 8)
        for i, (_, v) in enumerate(ttk):
            ax2.annotate(seconds_text(v), (v, i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
        ax2.set_xlabel("seconds until it answers from new documents", fontsize=8)
        ax2.set_title("time-to-knowledge (log scale)", fontsize=10)
        ax2.tick_params(axis="y", labelsize=8)
    else:
        ax2.axis("off")
    fig.tight_layout()
    return png(fig, dpi=110)


def describe(cfg: CompareJobConfig, stages: Stages, n_seen: int,
             retrain: Retrain | None) -> dict[str, tuple[str, str, str]]:
    """The qualitative columns of each system's row: (data it needs, compute to build, maintenance).

    Args:
        cfg: the comparison's config (what the fine-tuned system trains on).
        stages: the stages' seconds and resource-seconds.
        n_seen: the seen questions (the Q/A pairs the trained systems learn).
        retrain: the fine-tuned system's retraining in the update stage, when there was one.
    """
    ix = stages.index
    return {
        "base": ("nothing", "-", "none (knows nothing of the corpus)"),
        "finetuned": (f"{n_seen:,} Q/A pairs" + (" + the corpus text" if cfg.finetune.data != "qa" else ""),
                      cost_text(stages.finetuned),
                      "retrain on every change" + (f" ({seconds_text(retrain.seconds)} here)" if retrain else "")),
        "rag": (f"the corpus ({ix.docs:,} docs, {ix.chunks:,} chunks)", cost_text(ix),
                "`ragtune index add` per change" + (f" ({seconds_text(stages.index_add.seconds)} here)"
                                                   if stages.index_add else "")),
        "raft": (f"{n_seen:,} Q/A pairs + the corpus", f"{cost_text(ix)} + {cost_text(stages.raft)}",
                 "`index add` per change; retrain when the questions drift"),
    }


def seconds_text(x: float) -> str:
    return f"{x:.1f} s" if x < 10 else f"{x:.0f} s"


def cost_text(stage: IndexStage | TrainStage | None) -> str:
    """A stage's wall seconds and the resource-seconds it held, e.g. ``42 s (84 CPU-s)``."""
    if stage is None:
        return "-"
    used = ", ".join(f"{v:,.0f} {kind}-s" for kind, v in (("CPU", stage.cpu_seconds), ("GPU", stage.gpu_seconds))
                     if v is not None)
    return f"{seconds_text(stage.seconds)} ({used})" if used else seconds_text(stage.seconds)
