"""Benchmark: the hf generation engine alone, continuous against static batching, in one run.

Mixed-length requests (``max_tokens`` drawn from 8 to 128 with a fixed seed, prompts of mixed length, greedy) are
sent by ``--concurrency`` clients that each send their next request when the last one is answered, to one
``serving.generation.HFEngine`` per mode over the same loaded model (no Serve, no HTTP: what the decode loop
alone does). The modes alternate, ``--repeats`` rounds; printed: generated tokens/s and time-to-first-token
p50/p99 (medians over the rounds), continuous / static ratios, and whether the greedy outputs of the two modes are
identical request by request (they must be: on a trained model top tokens do not tie).

    python bench/generation.py                                # the tiny model trained for a few steps; ~2 minutes
    python bench/generation.py --model runs/demo/runs/reader/merged --requests 128   # a real reader
    python bench/generation.py --requests 20 --repeats 1      # a smoke run

Targets (issue 16): continuous >= 1.5x the tokens/s of static, TTFT p99 <= 0.5x. ``bench/serve.py`` imports
``compare_decoding`` to print the same comparison beside the app's numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.generators import TinySpec, build_tiny, load_model, load_tokenizer  # noqa: E402
from serving.generation import Decoder, GenRequest, HFEngine, SamplingParams  # noqa: E402

FACTS = [f"What is the capital of Zal{i}? Ophir{i % 7}. Where was Ana born? In Ophir{i % 5}." for i in range(300)]


def trained_tiny(work: Path, steps: int = 60) -> str:
    """The tiny preset trained for ``steps`` AdamW steps on its facts, so that greedy top tokens do not tie."""
    import torch

    out = work / "tiny-trained"
    if (out / "config.json").is_file():
        return str(out)
    base = str(build_tiny(work / "tiny", FACTS, TinySpec()))
    torch.manual_seed(0)
    tok, model = load_tokenizer(base), load_model(base).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        batch = tok(FACTS[step * 8 % len(FACTS):][:8], return_tensors="pt", padding=True)
        model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def mixed_requests(decoder: Decoder, n: int, min_tokens: int, max_tokens: int, seed: int) -> list[GenRequest]:
    """``n`` greedy requests: prompts of 4 to 40 words of the facts, ``max_tokens`` uniform in [min, max]."""
    rng = random.Random(seed)
    words = " ".join(FACTS).split()
    out = []
    for _ in range(n):
        start, length = rng.randrange(len(words) - 40), rng.randint(4, 40)
        ids = decoder.tokenizer(" ".join(words[start:start + length]), add_special_tokens=False)["input_ids"]
        budget = min(rng.randint(min_tokens, max_tokens), decoder.context - len(ids) - 1)
        out.append(GenRequest(ids, SamplingParams(max_tokens=budget)))
    return out


async def _load(engine: HFEngine, requests: list[GenRequest], concurrency: int) -> dict[str, Any]:
    """Closed-loop clients; per request: time to first token, tokens, text."""
    ttft: list[float] = [0.0] * len(requests)
    tokens, texts = [0] * len(requests), [""] * len(requests)
    todo = iter(range(len(requests)))

    async def client() -> None:
        for i in todo:
            t0 = time.perf_counter()
            async for d in engine.generate(requests[i], f"r{i}"):
                if not texts[i] and not tokens[i]:
                    ttft[i] = time.perf_counter() - t0
                texts[i] += d.text
                tokens[i] = d.completion_tokens

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    ttft.sort()
    return {"tokens_per_s": sum(tokens) / wall, "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
            "wall_s": wall, "tokens": sum(tokens), "texts": texts}


def _count_steps(decoder: Decoder) -> dict[str, float]:
    """Count (in the returned dict, as they happen) the decoder's forward passes: prefills and decode steps, the
    rows each decode step carries and how many of them were already done (padding a static batch), and the
    seconds spent in each; the instance's methods are wrapped until the caller deletes them."""
    steps: dict[str, float] = {"prefills": 0, "prefill_s": 0.0, "decodes": 0, "decode_s": 0.0, "decode_rows": 0,
                               "done_rows": 0}
    def counted(fn: Callable[[Any], Any], calls: str, seconds: str) -> Callable[[Any], Any]:
        def wrapper(arg: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(arg)
            finally:
                steps[calls] += 1
                steps[seconds] += time.perf_counter() - t0
        return wrapper

    counted_prefill = counted(decoder.prefill, "prefills", "prefill_s")
    timed_decode = counted(decoder.decode, "decodes", "decode_s")

    def counted_decode(batch: Any) -> Any:
        steps["decode_rows"] += len(batch.rows)
        steps["done_rows"] += sum(r.done for r in batch.rows)
        return timed_decode(batch)

    decoder.prefill, decoder.decode = counted_prefill, counted_decode  # type: ignore[method-assign]
    return steps


def _pct(sorted_xs: list[float], q: float) -> float:
    return sorted_xs[min(len(sorted_xs) - 1, int(round(q / 100 * (len(sorted_xs) - 1))))]


def compare_decoding(model: str, *, requests: int = 256, concurrency: int = 16, min_tokens: int = 8,
                     max_tokens: int = 128, max_batch_size: int = 16, repeats: int = 3, seed: int = 0,
                     batch_wait_s: float = 0.01, device: Literal["auto", "cpu", "gpu"] = "auto",
                     threads: int | None = None) -> dict[str, Any]:
    """Continuous vs static decoding of the same mixed-length requests on ``model``, alternating, ``repeats``
    rounds. Returns {"continuous": {...}, "static": {...}} (medians: tokens_per_s, ttft_p50_s, ttft_p99_s),
    "ratio" (continuous / static: tokens_per_s, ttft_p99_s), "identical" (greedy texts equal request by request
    in every round), "runs" (every round's numbers), and the settings."""
    decoder = Decoder.load(model, device, "auto", None, threads)
    reqs = mixed_requests(decoder, requests, min_tokens, max_tokens, seed)

    def run(mode: Literal["continuous", "static"], batch: list[GenRequest]) -> dict[str, Any]:
        steps = _count_steps(decoder)

        async def go() -> dict[str, Any]:
            engine = HFEngine(decoder, mode=mode, max_batch_size=max_batch_size, batch_wait_s=batch_wait_s)
            try:
                return await _load(engine, batch, concurrency)
            finally:
                await engine.close()

        try:
            out = asyncio.run(go())
        finally:
            del decoder.prefill, decoder.decode  # the class's methods again
        return {**out, **steps}

    run("continuous", reqs[:concurrency])  # warm-up (allocator, kernels)
    runs: list[dict[str, Any]] = []
    reference: list[str] | None = None
    identical = True
    for r in range(repeats):
        order: tuple[Literal["continuous", "static"], ...] = ("static", "continuous")
        for mode in order if r % 2 == 0 else order[::-1]:
            res = run(mode, reqs)
            texts = res.pop("texts")
            reference = reference or texts
            identical = identical and texts == reference
            runs.append({"round": r, "mode": mode, **res})

    def med(mode: str, key: str) -> float:
        return statistics.median(x[key] for x in runs if x["mode"] == mode)

    keys = ("tokens_per_s", "ttft_p50_s", "ttft_p99_s", "prefills", "decodes", "decode_rows", "done_rows",
            "prefill_s", "decode_s", "wall_s", "tokens")
    out: dict[str, Any] = {m: {k: med(m, k) for k in keys} for m in ("continuous", "static")}
    out["ratio"] = {"tokens_per_s": out["continuous"]["tokens_per_s"] / out["static"]["tokens_per_s"],
                    "ttft_p99_s": out["continuous"]["ttft_p99_s"] / out["static"]["ttft_p99_s"]}
    out["identical"] = identical
    out["runs"] = runs
    out["settings"] = {"model": model, "requests": requests, "concurrency": concurrency, "max_tokens": [min_tokens,
                       max_tokens], "max_batch_size": max_batch_size, "repeats": repeats, "seed": seed,
                       "device": str(decoder.device)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a causal LM folder or hub id (default: the tiny model, trained a few steps)")
    ap.add_argument("--requests", type=int, default=256, help="requests per round and mode (many more than the "
                    "concurrency, so that the start and the drain of a round weigh little)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--min-tokens", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-batch-size", type=int, default=16, help="rows decoded together at most (both modes)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds, modes alternating (medians over them)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or trained_tiny(Path(tmp))
        res = compare_decoding(model, requests=args.requests, concurrency=args.concurrency,
                               min_tokens=args.min_tokens, max_tokens=args.max_tokens,
                               max_batch_size=args.max_batch_size, repeats=args.repeats, seed=args.seed,
                               device=args.device, threads=args.threads)
    print(f"\n{args.requests} requests, max_tokens {args.min_tokens}-{args.max_tokens}, concurrency "
          f"{args.concurrency}, {args.repeats} rounds (medians), {res['settings']['device']}")
    print(f"{'mode':<12}{'tokens/s':>10}{'TTFT p50 ms':>13}{'TTFT p99 ms':>13}")
    for mode in ("continuous", "static"):
        m = res[mode]
        print(f"{mode:<12}{m['tokens_per_s']:>10.1f}{m['ttft_p50_s'] * 1e3:>13.1f}{m['ttft_p99_s'] * 1e3:>13.1f}")
    print("where the time goes (medians): forward passes, the rows a decode step carries, the share of them already "
          "done (padding), seconds in prefill / decode / the rest of the loop (merging, dropping, sampling)")
    for mode in ("continuous", "static"):
        m = res[mode]
        rows = m["decode_rows"] / max(m["decodes"], 1)
        per_forward = m["tokens"] / max(m["prefills"] + m["decodes"], 1)
        print(f"{mode:<12}{m['prefills']:>6.0f} prefills + {m['decodes']:>6.0f} decode steps ({per_forward:.1f} "
              f"tokens per forward), {rows:.1f} rows a step, {m['done_rows'] / max(m['decode_rows'], 1):.0%} done; "
              f"prefill {m['prefill_s']:.1f}s, decode {m['decode_s']:.1f}s, rest "
              f"{m['wall_s'] - m['prefill_s'] - m['decode_s']:.1f}s of {m['wall_s']:.1f}s")
    r = res["ratio"]
    print(f"continuous / static: tokens/s {r['tokens_per_s']:.2f}x (target >= 1.5x), TTFT p99 "
          f"{r['ttft_p99_s']:.2f}x (target <= 0.5x); greedy outputs identical: {res['identical']}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
