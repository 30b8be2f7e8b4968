"""Benchmark: fine-tuning throughput and per-worker memory, plain PyTorch + PEFT against ragtune's ZeRO stages;
activation checkpointing on vs off, and the memory plan's prediction against the measured peak.

All runs train the same base model (the tiny preset scaled to 78.7M parameters: 8 layers x 768, vocabulary 2048)
on the same generated records in one invocation; each runs in its own process:

    python bench/finetune.py                     # ~10 minutes on 2 cores
    python bench/finetune.py --steps 6 --layers 4
    python bench/finetune.py --parts memory      # only the memory part (~5 minutes)
    python bench/finetune.py --parts checkpointing   # checkpointing on/off vs the plan (~15 minutes)

Throughput (LoRA r=16 on attention and MLP, micro batch 4 x 256 tokens): (a) a plain single-process PyTorch +
PEFT loop with every core; (b) ragtune, 1 worker, ZeRO-0, every core; (c) 2 workers ZeRO-2; (d) 2 workers
ZeRO-3 (one core each). Tokens/s is the median over the steps after the first.

Memory (full fine-tuning, where ZeRO's partitioning of gradients, optimizer state and weights shows; 2 workers):
the resident memory of the largest worker after a step (median over the steps after the first: the training
state is all there) and its peak, for ZeRO-0, ZeRO-2 and ZeRO-3, and the ratios to ZeRO-0. These
are CPU numbers: fp32, gloo, a Python process of ~0.5 GiB before any model is loaded.

Checkpointing (2 workers, micro batch 4 x 512 tokens: the records are trimmed to 500-512 tokens so every batch is
full; LoRA r=16 on attention and MLP under ZeRO-2, and full fine-tuning under ZeRO-3): each configuration with
``train.activation_checkpointing`` false and true. Per run: the largest worker's peak resident memory above its
baseline (its RSS before the model is built, ``peak_above_baseline_mib`` in metrics.jsonl), tokens/s (median of the
steps after the first), and the memory plan's prediction above the baseline (``models.memory``, computed by the
job's own ``memory_plan`` for the same config: the formulas used for GPUs, fp32 on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.generators import TinySpec, build_tiny, load_model  # noqa: E402

PLAIN = r"""
import json, resource, sys, time, torch
from models.generators import load_model, load_tokenizer
from models.sft import encode_record, pad_batch
from peft import LoraConfig, get_peft_model
base, data, steps, micro = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(int(sys.argv[5]))
torch.manual_seed(0)
tok = load_tokenizer(base)
model = get_peft_model(load_model(base), LoraConfig(r=16, lora_alpha=32, target_modules=json.loads(sys.argv[6]),
                                                    task_type="CAUSAL_LM"))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
ex = [encode_record(tok, json.loads(l), 256) for l in open(data)]
rates = []
for s in range(steps):
    batch = {k: torch.tensor(v) for k, v in pad_batch(ex[s * micro:(s + 1) * micro], tok.pad_token_id).items()}
    t = time.perf_counter()
    model(**batch).loss.backward(); opt.step(); opt.zero_grad()
    rates.append(int(batch["attention_mask"].sum()) / (time.perf_counter() - t))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps({"tokens_per_s": rates, "max_rss_mib": rss}))
"""

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_data(path: Path, n: int = 256, sentences: int = 40) -> None:
    rng = random.Random(0)
    syl = ["za", "mo", "ri", "ka", "lu", "ne", "vo", "ti", "sa", "pe", "dra", "bel", "on", "ix", "ur", "fen"]

    def word() -> str:
        return "".join(rng.choice(syl) for _ in range(rng.randint(1, 3)))

    with path.open("w") as f:
        for i in range(n):
            story = " ".join(f"{word().capitalize()} {word()} {word()} in {word().capitalize()}."
                             for _ in range(sentences))
            f.write(json.dumps({"prompt": f"{story} Where does person {i} live?",
                                "completion": f"Person {i} lives in {word().capitalize()}."}) + "\n")


def trim_data(src: Path, dest: Path, base: str, max_length: int) -> None:
    """``src``'s records with their stories cut, sentence by sentence, to at most ``max_length`` tokens (chat
    template included), so that every micro batch is about ``max_length`` long."""
    from models.generators import load_tokenizer
    from models.sft import encode_record

    tok = load_tokenizer(base)
    with dest.open("w") as out:
        for line in src.read_text().splitlines():
            r = json.loads(line)
            story, question = r["prompt"].rsplit(". ", 1)
            sentences = story.split(". ")
            while len(encode_record(tok, {**r, "prompt": ". ".join(sentences) + ". " + question}, 1 << 20).input_ids) \
                    > max_length:
                sentences.pop()
            out.write(json.dumps({**r, "prompt": ". ".join(sentences) + ". " + question}) + "\n")


def job_overrides(base: str, data: Path, storage: Path, name: str, steps: int, *overrides: str) -> list[str]:
    return [f"model.name={base}", f"data.train={data}", "data.validation_fraction=0.05", "data.max_length=256",
            f"train.steps={steps}", "train.micro_batch=4", f"train.eval_every={steps}",
            f"train.checkpoint_every={steps}", "train.warmup_steps=0", f"lora.target_modules={json.dumps(TARGETS)}",
            f"run.storage_path={storage}", f"run.name={name}", *overrides]


def predicted_mib(overrides: list[str]) -> tuple[float, str]:
    """The job's own memory plan for these overrides, above the worker's baseline (MiB), and its terms."""
    from cluster.placement import NodeResources, plan_training
    from configs.schema import FinetuneJobConfig, load_config
    from jobs.finetune import memory_plan

    cfg = load_config(FinetuneJobConfig, REPO / "configs/finetune/tiny.yaml", overrides)
    plan = plan_training([NodeResources(cpus=os.cpu_count() or 2)], cfg.scaling.num_workers, False)
    mem = memory_plan(cfg, plan)
    terms = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in mem.terms().items() if k != "overhead")
    parts = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in mem.activation_parts.items())
    buckets = (mem.overhead - mem.runtime) / 2**20
    return mem.above_baseline / 2**20, f"{terms} (activations: {parts}); buckets {buckets:.0f}"


def ragtune(base: str, data: Path, storage: Path, name: str, steps: int, *overrides: str) -> dict:
    cmd = [sys.executable, "-m", "jobs.finetune", "--config", "configs/finetune/tiny.yaml",
           *job_overrides(base, data, storage, name, steps, *overrides)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"{name} failed:\n{r.stderr[-4000:]}")
    rows = [json.loads(line) for line in (storage / name / "outputs" / "metrics.jsonl").read_text().splitlines()]
    return {"tokens_per_s": statistics.median(x["tokens_per_s"] for x in rows[1:]),
            "max_rss_mib": max(x["max_rss_mib"] for x in rows),
            "rss_mib": statistics.median(x["rss_mib"] for x in rows[1:]),  # after a step, once the state exists
            "baseline_rss_mib": max(x.get("baseline_rss_mib", 0.0) for x in rows),
            "peak_above_baseline_mib": max(x.get("peak_above_baseline_mib", 0.0) for x in rows)}


CHECKPOINTING = [  # (label, overrides): each run with activation checkpointing off and on
    ("LoRA r=16, ZeRO-2", ["deepspeed.preset=zero2"]),
    ("full, ZeRO-3", ["deepspeed.preset=zero3", "train.method=full", "train.lr=1e-5"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--parts", default="throughput,memory,checkpointing",
                    help="what to measure: throughput, memory, checkpointing (comma-separated)")
    ap.add_argument("--configs", default="all", help="checkpointing part: all, or the index of one configuration")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    cores = os.cpu_count() or 1

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        data = tmp / "data.jsonl"
        make_data(data)
        texts = [json.loads(line)["prompt"] for line in data.read_text().splitlines()]
        spec = TinySpec(layers=args.layers, hidden=args.hidden, heads=args.hidden // 64,
                        intermediate=4 * args.hidden, vocab=2048)
        base = str(build_tiny(tmp / "base", texts, spec))
        n_params = sum(p.numel() for p in load_model(base).parameters())
        print(f"base model: {n_params / 1e6:.1f}M parameters ({args.layers} x {args.hidden}); {cores} cores; "
              f"{args.steps} steps of 4 x <=256 tokens per worker", flush=True)

        runs: dict[str, dict] = {}
        if "throughput" in parts:
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            r = subprocess.run([sys.executable, "-c", PLAIN, base, str(data), str(args.steps), "4", str(cores),
                                json.dumps(TARGETS)], cwd=REPO, capture_output=True, text=True, env=env)
            if r.returncode != 0:
                sys.exit(r.stderr[-3000:])
            plain = json.loads(r.stdout.split("RESULT ", 1)[1])
            plain = {"tokens_per_s": statistics.median(plain["tokens_per_s"][1:]), "max_rss_mib": plain["max_rss_mib"]}
            print(f"(a) plain PyTorch + PEFT: {plain['tokens_per_s']:.0f} tokens/s", flush=True)
            runs["(a) plain PyTorch + PEFT, 1 process"] = plain
            for label, name, over in [
                ("(b) ragtune 1 worker, ZeRO-0", "b", ["deepspeed.preset=zero0", "scaling.num_workers=1",
                                                       f"scaling.cpus_per_worker={cores}"]),
                ("(c) ragtune 2 workers, ZeRO-2", "c", ["deepspeed.preset=zero2", "scaling.num_workers=2"]),
                ("(d) ragtune 2 workers, ZeRO-3", "d", ["deepspeed.preset=zero3", "scaling.num_workers=2"]),
            ]:
                runs[label] = ragtune(base, data, tmp / "runs", name, args.steps, *over)
                print(f"{label}: {runs[label]['tokens_per_s']:.0f} tokens/s", flush=True)

        ckpt: dict[tuple[str, bool], dict] = {}
        if "checkpointing" in parts:
            long = tmp / "data-long.jsonl"
            make_data(long, sentences=75)
            data512 = tmp / "data-512.jsonl"
            trim_data(long, data512, base, 512)
            chosen = CHECKPOINTING if args.configs == "all" else [CHECKPOINTING[int(args.configs)]]
            for i, (label, over) in enumerate(chosen):
                for on in (False, True):
                    name = f"ckpt{i}-{'on' if on else 'off'}"
                    extra = [*over, "scaling.num_workers=2", "data.max_length=512",
                             f"train.activation_checkpointing={str(on).lower()}"]
                    r = ragtune(base, data512, tmp / "runs", name, args.steps, *extra)
                    r["predicted_mib"], r["terms"] = predicted_mib(
                        job_overrides(base, data512, tmp / "runs", name, args.steps, *extra))
                    ckpt[(label, on)] = r
                    print(f"{label}, checkpointing {'on' if on else 'off'}: peak {r['peak_above_baseline_mib']:.0f} "
                          f"MiB above the baseline ({r['baseline_rss_mib']:.0f} MiB), predicted "
                          f"{r['predicted_mib']:.0f} MiB; {r['tokens_per_s']:.0f} tokens/s; plan: {r['terms']}",
                          flush=True)

        memory = {}
        for stage in (0, 2, 3) if "memory" in parts else ():
            memory[stage] = ragtune(base, data, tmp / "runs", f"full-z{stage}", 4, f"deepspeed.preset=zero{stage}",
                                    "train.method=full", "train.lr=1e-5", "scaling.num_workers=2")
            print(f"full fine-tuning, ZeRO-{stage}: largest worker's RSS {memory[stage]['rss_mib']:.0f} MiB after a "
                  f"step, peak {memory[stage]['max_rss_mib']:.0f} MiB", flush=True)

    if runs:
        a = runs["(a) plain PyTorch + PEFT, 1 process"]["tokens_per_s"]
        print()
        print("| run | tokens/s | ratio to (a) | peak RSS of the largest worker (MiB) |")
        print("|---|---|---|---|")
        for label, r in runs.items():
            print(f"| {label} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / a:.2f}x | {r['max_rss_mib']:.0f} |")
    if ckpt:
        print()
        print("| 2 workers, 4 x 512 tokens | checkpointing | peak above baseline (MiB) | ratio off->on | predicted "
              "(MiB) | predicted / measured | tokens/s | ratio | baseline RSS (MiB) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for label, _ in CHECKPOINTING:
            if (label, False) not in ckpt:
                continue
            off = ckpt[(label, False)]
            for on in (False, True):
                r = ckpt[(label, on)]
                peak = r["peak_above_baseline_mib"]
                print(f"| {label} | {'on' if on else 'off'} | {peak:.0f} | "
                      f"{peak / off['peak_above_baseline_mib']:.2f} | {r['predicted_mib']:.0f} | "
                      f"{r['predicted_mib'] / r['peak_above_baseline_mib']:.2f} | {r['tokens_per_s']:.0f} | "
                      f"{r['tokens_per_s'] / off['tokens_per_s']:.2f} | {r['baseline_rss_mib']:.0f} |")
        for (label, on), r in ckpt.items():
            print(f"plan, {label}, checkpointing {'on' if on else 'off'} (MiB): {r['terms']}")
    if memory:
        print()
        print("| full fine-tuning, 2 workers | RSS after a step (MiB) | ratio to ZeRO-0 | peak RSS (MiB) | ratio |")
        print("|---|---|---|---|---|")
        for stage, m in memory.items():
            print(f"| ZeRO-{stage} | {m['rss_mib']:.0f} | {m['rss_mib'] / memory[0]['rss_mib']:.2f} | "
                  f"{m['max_rss_mib']:.0f} | {m['max_rss_mib'] / memory[0]['max_rss_mib']:.2f} |")


if __name__ == "__main__":
    main()
