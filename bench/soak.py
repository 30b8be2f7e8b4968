"""Soak: the serving app under a bounded open-loop load for ten minutes, with index updates, replica kills and a
burst, on 127.0.0.1; it stops by itself.

    python bench/soak.py                                          # ~14 minutes on 2 cores (10 of them the soak)
    python bench/soak.py --duration 150 --burst-at 60 --kill-every 50 --update-every 20    # a short run

Setup (as ``bench/serve.py``, whose helpers it uses): ``--paragraphs`` SQuAD paragraphs embedded and indexed (Flat, 2
shards) by the real jobs, a tiny generator, and the app deployed with Serve on a local Ray in the layout the serving
plan chooses for a small index: fused, with its 2 replicas IndexReplica replicas behind one Ingress
(``shards.fused_in_ingress`` auto; ``--fused-in-ingress true`` puts the index in each Ingress replica; ``--layout
split`` behind the Ingress, in ShardSearcher replicas), ``shards.replicas`` 2, so that one replica can be lost while
the other answers.
Then:

1. capacity: a short closed loop on ``/v1/search`` and on RAG chat (``/v1/chat/completions``, ``--max-tokens``) at
   fixed concurrency; the mix's closed-loop rate (``--chat-share`` of the requests are chats) is
   1 / ((1 - share) / search req/s + share / chat req/s). That overestimates what the app sustains (about 2x on
   2 cores, where the load generator shares the cores), so then an open-loop ramp of the mix, ``--ramp-step-s``
   seconds at each of ``RAMP`` x the closed-loop rate, stops at the first step that is not answered in full (a
   non-200, or a p99 of searches or of chats over half the request timeout, ``limits.latency_target_share``'s
   default): the last step answered in full is the capacity (or ``--capacity`` gives it, to compare two
   versions of the code at the same rates: the ramp's answer varies by a step from run to run). What is
   measured after this is "after warm-up".
2. the soak: ``--duration`` seconds of an open loop at ``--load`` x that capacity (a fixed schedule, so a fixed
   request count, printed first), with ``--burst-x`` x capacity for ``--burst-len`` seconds from ``--burst-at`` (one
   or more start times: a burst at each); every ``--update-every`` s ``jobs.freshness.add`` of new paragraphs and
   ``jobs.freshness.delete`` of the ones the previous update added (in this process, a thread), then ``POST
   /admin/reload``; every ``--kill-every`` s one of the two replicas that hold shards (in turn: fused, an
   IndexReplica replica, whose calls the Ingress retries on the other, or with ``--fused-in-ingress true`` an
   Ingress replica, and its requests in flight are lost with it; split, a ShardSearcher replica, whose calls the
   Retriever retries on the other) is killed with SIGKILL and Serve replaces it; every ``--sample-every`` s the RSS
   and anonymous memory (/proc/PID/status ``RssAnon``) of each replica of the app.

Printed: every 10 s window (requests by status, p50/p99 of the 200s, req/s), then requests by status in and out of
the burst, the versions that answered, each replica's memory, and the targets with PASS/FAIL and their figures:

- outside the burst, every response is a 200 (the burst's window is the burst plus ``limits.request_timeout_s``
  after it, while its queue drains);
- in the burst, only 200, 429 or 503, and nothing answered later than ``limits.request_timeout_s`` + 1 s;
- every search answer names a published version (the first, or one an update wrote) and every chunk it returns is
  live in that version; every chat citation is live in some published version;
- each replica's anonymous memory at its last sample is within 1.1x of its value after warm-up (a restarted
  replica: ``--warm-s`` after Serve reported it running) plus what the added documents account for (the
  resident bytes of the newest version less those of the first, ``serving.app.fused_bytes``).

Exit status 1 when a target fails. Written: ``--out``.json (the windows, memory series, events, the non-200
responses with their bodies, the targets) and ``--out``.png (p50/p99 and memory over time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.freshness import load_average, write_jsonl  # noqa: E402
from bench.serve import IN_INGRESS, SQUAD, corpus_and_queries, free_port, load, pct  # noqa: E402
from configs.schema import EmbedJobConfig, IndexJobConfig, ServeJobConfig  # noqa: E402
from jobs.embed import run as embed  # noqa: E402
from jobs.index import run as index  # noqa: E402
from jobs.plots import pyplot  # noqa: E402
from jobs.serve import wait_ready  # noqa: E402
from models.generators import TinySpec, build_tiny  # noqa: E402
from serving.app import ServeAppArgs, build_app, fused_bytes, plan_for  # noqa: E402
from serving.versions import version_name  # noqa: E402
from sharding.freshness import live_ids  # noqa: E402
from sharding.manifest import read_index_manifest, resolve_index  # noqa: E402

APP = "soak"
WINDOW_S = 10.0
RAMP = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # the open-loop ramp's rates, x the closed-loop capacity


@dataclass
class Req:
    """One request of the soak: when it was sent (s from the start), its kind, status (an HTTP status, or the
    client error's name), latency; for a 200, the version named (search) and the chunk ids returned."""

    t: float
    kind: str
    status: int | str = 0
    latency: float = float("nan")
    version: str | None = None
    chunks: list[int] = field(default_factory=list)
    body: str = ""


def app_replicas() -> dict[str, tuple[str, int]]:
    """The app's alive replicas: actor name -> (deployment, pid), from the GCS actor table."""
    import ray._private.state as state

    out = {}
    for a in state.actors().values():
        name = a.get("Name") or ""
        if name.startswith(f"SERVE_REPLICA::{APP}#") and a["State"] == "ALIVE" and a.get("Pid"):
            out[name] = (name.split("#")[1], int(a["Pid"]))
    return out


def memory(pid: int) -> tuple[int, int] | None:
    """(VmRSS, RssAnon) of a process in bytes; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kb = {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in text.splitlines() if ":" in ln)
          if k in ("VmRSS", "RssAnon")}
    if not kb.get("VmRSS"):  # a process that is exiting (a zombie has no memory lines)
        return None
    return kb["VmRSS"] * 1024, kb.get("RssAnon", 0) * 1024


def running(deployment: str) -> int:
    """Replicas Serve reports RUNNING for one deployment of the app."""
    from ray import serve

    app = serve.status().applications.get(APP)
    d = app.deployments.get(deployment) if app else None
    return d.replica_states.get("RUNNING", 0) if d else 0


def spans(burst_at: list[float]) -> str:
    return ", ".join(f"{a:g}s" for a in burst_at)


def schedule(duration: float, rate: float, burst_at: list[float], burst_len: float, burst_rate: float) -> list[float]:
    """Send times (s) of the open loop: ``rate`` per second, ``burst_rate`` in each [a, a + burst_len) of
    ``burst_at``."""
    out, t = [], 0.0
    while t < duration:
        out.append(t)
        t += 1.0 / (burst_rate if any(a <= t < a + burst_len for a in burst_at) else rate)
    return out


class Soak:
    def __init__(self, args: argparse.Namespace, url: str, root: Path, cfg: ServeJobConfig, queries: list[str],
                 new_docs: list[dict], work: Path):
        self.args, self.url, self.root, self.cfg, self.queries = args, url, root, cfg, queries
        self.new_docs, self.work = new_docs, work
        self.reqs: list[Req] = []
        self.events: list[dict] = []  # kills, updates, reloads, recoveries
        self.samples: list[dict] = []  # memory: {t, replica, deployment, pid, rss, anon}
        self.published: dict[str, set[int]] = {}  # version name -> its live chunk ids
        self.allowance: dict[str, int] = {}  # version name -> resident bytes beyond the first version's
        self.mode = "auto"
        self.layout = "fused"  # the serving plan's layout (main sets it)
        self.t0 = 0.0
        self.stop = threading.Event()
        self.base_bytes = 0
        self.previous: list[dict] = []  # the documents the last update added

    def now(self) -> float:
        return time.perf_counter() - self.t0

    # --- versions ------------------------------------------------------------------------------------------------

    def publish(self, version: str) -> str:
        """Record a version the index now has (its live chunk ids, its resident bytes); its name."""
        from serving.rag import resolve_mode

        loc = resolve_index(str(self.root / version_name(version)))
        m = read_index_manifest(loc)
        name = version_name(version)
        self.published[name] = set(live_ids(loc, m, ("chunk_id",))["chunk_id"].to_pylist())
        mode = resolve_mode(self.cfg.retrieval.mode, m, loc.uri, "retrieval.mode")
        b = fused_bytes(loc, m, self.cfg, mode)
        if not self.allowance:
            self.base_bytes = b
        self.allowance[name] = max(0, b - self.base_bytes)
        return name

    # --- the load ------------------------------------------------------------------------------------------------

    def body(self, i: int) -> tuple[str, str, dict]:
        q = self.queries[i % len(self.queries)]
        every = max(1, round(1 / self.args.chat_share)) if self.args.chat_share > 0 else 0
        if every and i % every == every - 1:
            return "chat", "/v1/chat/completions", {
                "model": "tiny", "max_tokens": self.args.max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": q}]}
        return "search", "/v1/search", {"query": q, "k": 5}

    async def one(self, session, i: int, t_sent: float) -> None:
        import aiohttp

        kind, path, body = self.body(i)
        r = Req(t=t_sent, kind=kind)
        self.reqs.append(r)
        t0 = time.perf_counter()
        try:
            async with session.post(self.url + path, json=body) as resp:
                raw = await resp.read()
                r.status = resp.status
            r.latency = time.perf_counter() - t0
            if r.status == 200:
                out = json.loads(raw)
                if kind == "search":
                    r.version = out.get("version")
                    r.chunks = [h["chunk_id"] for h in out.get("data", [])]
                else:
                    r.chunks = [c["chunk_id"] for c in out.get("citations", [])]
            else:
                r.body = raw[:300].decode(errors="replace")
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            r.latency = time.perf_counter() - t0
            r.status = type(e).__name__
            r.body = str(e)[:300]

    async def drive(self, times: list[float]) -> None:
        import aiohttp

        limit = self.cfg.limits.request_timeout_s
        conn = aiohttp.TCPConnector(limit=0)
        tasks = []
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=limit + 10)) as s:
            for i, t in enumerate(times):
                delay = t - self.now()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(self.one(s, i, t)))
            await asyncio.gather(*tasks)
        self.stop.set()

    # --- what happens beside the load (threads) -----------------------------------------------------------------

    def every(self, period: float, fn, first: float | None = None) -> threading.Thread:
        def loop() -> None:
            n = 1
            while not self.stop.wait(max(0.0, (first if first is not None else period) + (n - 1) * period
                                         - self.now())):
                try:
                    fn(n)
                except Exception as e:  # recorded, the soak goes on
                    self.events.append({"t": self.now(), "event": "error", "in": fn.__name__, "error": repr(e)})
                    print(f"[{self.now():6.1f}s] {fn.__name__} failed: {e!r}", flush=True)
                n += 1

        th = threading.Thread(target=loop, daemon=True, name=fn.__name__)
        th.start()
        return th

    def sample(self, n: int = 0) -> None:
        t = self.now()
        for name, (dep, pid) in app_replicas().items():
            m = memory(pid)
            if m:
                self.samples.append({"t": t, "replica": name.split("#")[-1], "deployment": dep, "pid": pid,
                                     "rss": m[0], "anon": m[1]})

    def update(self, n: int) -> None:
        """``index add`` of the next new paragraphs, ``index delete`` of those the previous update added, then a
        reload; each version written is published (recorded) before the reload makes it visible."""
        import urllib.error
        import urllib.request

        from jobs.freshness import add, delete

        k = self.args.docs_per_update
        batch = [self.new_docs[(n - 1) * k % len(self.new_docs) + j] for j in range(k)]
        batch = [{**d, "_id": f"soak-{n}-{d['_id']}"} for d in batch]
        path = self.work / f"update-{n}.jsonl"
        write_jsonl(path, batch)
        t = self.now()
        a = add(str(self.root), corpus=str(path), id_field="_id")
        versions = [self.publish(a.version)]
        if n > 1:
            d = delete(str(self.root), doc_ids=[doc["_id"] for doc in self.previous])
            versions.append(self.publish(d.version))
        self.previous = batch
        t_written = self.now()
        req = urllib.request.Request(f"{self.url}/admin/reload", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
        reloaded: dict = {}
        failures = []
        for _ in range(3):  # as a client would: a reload that fails (a replica killed under it) is asked again
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    reloaded = json.loads(r.read())
                break
            except (urllib.error.HTTPError, OSError) as e:
                body = e.read()[:200].decode(errors="replace") if isinstance(e, urllib.error.HTTPError) else ""
                failures.append(f"{e} {body}".strip())
                time.sleep(2)
        self.events.append({"t": t, "event": "update", "versions": versions, "write_s": t_written - t,
                            "reload_s": self.now() - t_written, "reloaded": reloaded.get("version"),
                            "reload_failures": failures})
        if failures:
            print(f"[{self.now():6.1f}s] reload failures: {failures}", flush=True)
        print(f"[{t:6.1f}s] update {n}: added {k} docs{', deleted ' + str(k) if n > 1 else ''} -> "
              f"{', '.join(versions)} in {t_written - t:.1f}s; reload -> {reloaded.get('version')} in "
              f"{self.now() - t_written:.1f}s", flush=True)

    def kill(self, n: int) -> None:
        """SIGKILL one of the replicas that hold shards (in turn): the IndexReplica replicas in the fused layout (the
        Ingress replicas when they hold the index), the ShardSearcher groups' in the split one; then wait until
        Serve runs two of its deployment again."""
        holders = sorted((name, pid, dep) for name, (dep, pid) in app_replicas().items()
                         if dep == "Ingress" and self.layout == "fused" or dep == "IndexReplica"
                         or dep.startswith("ShardSearcher"))
        if not holders or self.now() >= self.args.duration - 1:  # none as the last requests are answered
            return
        name, pid, dep = holders[(n - 1) % len(holders)]
        t = self.now()
        os.kill(pid, signal.SIGKILL)
        print(f"[{t:6.1f}s] killed {dep} replica {name.split('#')[-1]} (pid {pid})", flush=True)
        ev = {"t": t, "event": "kill", "replica": name.split("#")[-1], "pid": pid, "deployment": dep}
        self.events.append(ev)
        deadline = time.monotonic() + 180
        seen_down = False
        while time.monotonic() < deadline and not self.stop.is_set():
            alive = [x for x, (d, _) in app_replicas().items() if d == dep and x != name]
            up = running(dep)
            seen_down = seen_down or up < 2
            if len(alive) >= 2 and up >= 2 and seen_down:
                ev["recovered_s"] = self.now() - t
                print(f"[{self.now():6.1f}s] Serve runs 2 {dep} replicas again ({ev['recovered_s']:.1f}s after "
                      "the kill)", flush=True)
                return
            time.sleep(0.5)

    def report_windows(self) -> None:
        """Print each 10 s window once it is over (its requests sent in it, answered or timed out)."""
        done = 0
        limit = self.cfg.limits.request_timeout_s + 10
        while True:
            stopped = self.stop.wait(2)
            t = self.now()
            while (done + 1) * WINDOW_S + limit < t or (stopped and done * WINDOW_S < self.args.duration):
                print(self.window_line(self.window(done)), flush=True)
                done += 1
            if stopped:
                return

    def window(self, w: int) -> dict:
        rs = [r for r in self.reqs if w * WINDOW_S <= r.t < (w + 1) * WINDOW_S]
        ok = [r.latency for r in rs if r.status == 200]
        by: dict[str, int] = {}
        for r in rs:
            by[str(r.status)] = by.get(str(r.status), 0) + 1
        return {"t": w * WINDOW_S, "sent": len(rs), "status": by, "p50": pct(ok, .5), "p99": pct(ok, .99),
                "ok_rps": len(ok) / WINDOW_S}

    @staticmethod
    def window_line(w: dict) -> str:
        st = " ".join(f"{k}:{v}" for k, v in sorted(w["status"].items()))
        return (f"  {w['t']:5.0f}-{w['t'] + WINDOW_S:3.0f}s sent {w['sent']:4d} [{st}] 200/s {w['ok_rps']:5.1f} "
                f"p50 {w['p50'] * 1e3:6.0f} ms p99 {w['p99'] * 1e3:6.0f} ms")


def capacity(url: str, queries: list[str], args: argparse.Namespace) -> dict:
    """Closed-loop requests/s of search and of RAG chat (warmed up first), and of the mix (time shared)."""
    s_bodies = [{"query": queries[i % len(queries)], "k": 5} for i in range(args.cap_requests)]
    c_bodies = [{"model": "tiny", "max_tokens": args.max_tokens, "temperature": 0,
                 "messages": [{"role": "user", "content": queries[i % len(queries)]}]}
                for i in range(max(16, args.cap_requests // 4))]
    asyncio.run(load(url + "/v1/search", s_bodies[:64], 16))
    asyncio.run(load(url + "/v1/chat/completions", c_bodies[:16], 8))
    lat_s, fail_s, wall_s = asyncio.run(load(url + "/v1/search", s_bodies, 16))
    lat_c, fail_c, wall_c = asyncio.run(load(url + "/v1/chat/completions", c_bodies, 8))
    search, chat = len(lat_s) / wall_s, len(lat_c) / wall_c
    share = args.chat_share
    mix = 1 / ((1 - share) / search + share / chat)
    return {"search_rps": search, "chat_rps": chat, "mix_rps": mix, "failed": fail_s + fail_c,
            "search_p99": pct(lat_s, .99), "chat_p99": pct(lat_c, .99)}


def sustained(new_soak, args: argparse.Namespace, closed: float) -> dict:
    """The highest rate of the mix (open loop, ``new_soak()`` sends it) the app answers in full: ``RAMP`` x the
    closed-loop rate ``closed``, ``--ramp-step-s`` each, up to the first step with a non-200 or a p99 over half
    the request timeout for either kind (search, chat)."""
    steps, best = [], 0.0
    for f in RAMP:
        rate = f * closed
        soak = new_soak()
        soak.t0 = time.perf_counter()
        asyncio.run(soak.drive(schedule(args.ramp_step_s, rate, [], 0, rate)))
        ok = [r for r in soak.reqs if r.status == 200]
        p99 = {kind: pct([r.latency for r in ok if r.kind == kind], .99) if any(r.kind == kind for r in ok)
               else math.inf for kind in sorted({r.kind for r in soak.reqs})}
        full = len(ok) == len(soak.reqs) and max(p99.values()) <= args.request_timeout / 2
        others = {str(r.status) for r in soak.reqs if r.status != 200}
        steps.append({"x_closed": f, "rate": rate, "sent": len(soak.reqs), "ok": len(ok), "p99": p99,
                      "others": sorted(others), "full": full})
        print(f"  ramp {rate:5.1f} req/s ({f:.1f}x the closed loop): {len(ok)}/{len(soak.reqs)} answered 200, p99 "
              + ", ".join(f"{kind} {v * 1e3:.0f} ms" for kind, v in p99.items())
              + (f" (others {', '.join(sorted(others))})" if others else "")
              + f" -> {'in full' if full else 'not in full: the ramp stops'}", flush=True)
        if not full:
            time.sleep(args.request_timeout + 2)  # its queue drains before what follows
            break
        best = rate
    return {"rate": best or RAMP[0] * closed, "steps": steps, "closed": closed}


def memory_targets(soak: Soak, warm_at: float, warm_s: float, latest: str) -> list[dict]:
    """Each replica: its anonymous memory after warm-up (the originals: the sample at ``warm_at``; those that
    started later: the first sample ``warm_s`` after they were first seen), at its last sample, and the bound."""
    by: dict[tuple[str, int], list[dict]] = {}
    for s in soak.samples:
        by.setdefault((s["replica"], s["pid"]), []).append(s)
    allowance = soak.allowance.get(latest, 0)
    out = []
    ready = sorted(e["t"] + e["recovered_s"] for e in soak.events if e["event"] == "kill" and "recovered_s" in e)
    for (replica, pid), ss in by.items():
        first = ss[0]["t"]
        # a replacement: warm once it has served warm_s since Serve reported it running (the kill's recovery)
        running_at = next((t for t in ready if t >= first - soak.args.sample_every), first)
        start = warm_at if first <= warm_at + 1.0 else running_at + warm_s  # the originals: sampled at warm_at
        warm = next((s for s in ss if s["t"] >= start), None)
        last = ss[-1]
        row = {"replica": replica, "deployment": ss[0]["deployment"], "pid": pid, "first_s": first,
               "last_s": last["t"], "peak_anon": max(s["anon"] for s in ss), "last_anon": last["anon"],
               "last_rss": last["rss"]}
        if warm is None or warm is last:
            row["verdict"] = "not measured (did not live past its warm-up)"
        else:
            bound = 1.1 * warm["anon"] + allowance
            row |= {"warm_anon": warm["anon"], "warm_s": warm["t"], "bound": bound,
                    "ratio": last["anon"] / warm["anon"], "ok": last["anon"] <= bound}
        out.append(row)
    return out


def memory_table(samples: list[dict], every: float = 60.0) -> list[str]:
    """Each replica's anonymous memory (MiB) over time: a row per ``every`` seconds (the sample nearest after it),
    a column per replica ("-": not alive then)."""
    keys = sorted({(s["deployment"], s["replica"]) for s in samples}, key=lambda k: min(
        s["t"] for s in samples if (s["deployment"], s["replica"]) == k))
    end = max((s["t"] for s in samples), default=0.0)
    lines = ["| s | " + " | ".join(f"{d} {r}" for d, r in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    t = 0.0
    while t <= end + 1e-9:
        cells = []
        for k in keys:
            after = [s for s in samples if (s["deployment"], s["replica"]) == k and t <= s["t"] < t + every]
            cells.append(f"{after[0]['anon'] / 2**20:.0f}" if after else "-")
        lines.append(f"| {t:.0f} | " + " | ".join(cells) + " |")
        t += every
    return lines


def mib(b: float) -> str:
    return f"{b / 2**20:.0f} MiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600, help="seconds of the soak's load")
    ap.add_argument("--load", type=float, default=0.8, help="the open loop's rate, x the measured capacity")
    ap.add_argument("--burst-at", type=float, nargs="+", default=[270],
                    help="when the burst starts (s into the soak); more than one value: a burst at each")
    ap.add_argument("--burst-len", type=float, default=30)
    ap.add_argument("--burst-x", type=float, default=3.0, help="the burst's rate, x the measured capacity")
    ap.add_argument("--kill-every", type=float, default=120, help="seconds between replica kills (0: none)")
    ap.add_argument("--update-every", type=float, default=30, help="seconds between index updates (0: none)")
    ap.add_argument("--docs-per-update", type=int, default=5, help="paragraphs added (and deleted) per update")
    ap.add_argument("--sample-every", type=float, default=5, help="seconds between memory samples")
    ap.add_argument("--warm-s", type=float, default=30, help="a restarted replica's warm-up (s after first seen)")
    ap.add_argument("--chat-share", type=float, default=0.2, help="share of the requests that are RAG chats")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens per chat answer (greedy)")
    ap.add_argument("--paragraphs", type=int, default=400, help="SQuAD paragraphs in the index")
    ap.add_argument("--layout", choices=("auto", "fused", "split"), default="auto",
                    help="shards.layout (auto: the plan's choice, fused for this index)")
    ap.add_argument("--fused-in-ingress", choices=("auto", "true", "false"), default="auto",
                    help="shards.fused_in_ingress (auto: false with 2 or more replicas; false = IndexReplica replicas "
                    "behind one Ingress, which retries a replica lost mid-call on another, at one more hop)")
    ap.add_argument("--cap-requests", type=int, default=300, help="search requests of the closed-loop capacity")
    ap.add_argument("--capacity", type=float, help="the open-loop capacity (req/s) instead of the ramp's: the soak "
                    "and burst rates of an earlier run, to compare two versions of the code at the same load")
    ap.add_argument("--ramp-step-s", type=float, default=20, help="seconds of each step of the open-loop ramp")
    ap.add_argument("--threads", type=int, help="torch and FAISS threads of every replica (shards, embedder and "
                    "generator .threads; default: the serving plan's)")
    ap.add_argument("--request-timeout", type=float, default=10, help="limits.request_timeout_s")
    ap.add_argument("--max-concurrent", type=int, default=256, help="limits.max_concurrent_requests per replica "
                    "(below it, limits.latency_target_share adapts each route's limit)")
    ap.add_argument("--compute-nice", type=int, help="limits.compute_nice (default: the config's; 0 = the computing "
                    "replicas at Ray's priority, as before it existed)")
    ap.add_argument("--work", help="working folder, kept: the base index and model are built once in it and "
                    "reused by later runs (default: a new temporary folder)")
    ap.add_argument("--out", default="bench-soak", help="output prefix: OUT.json, OUT.png")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # this process is the load generator (and the updater): leave the cores to the app
    from ray import serve

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    base = work / f"base-{args.paragraphs}"  # built once per --work folder; each run updates a copy of its index
    corpus, queries = corpus_and_queries(args.paragraphs, work)
    with open(SQUAD / "corpus.jsonl") as f:  # the paragraphs the updates add: those after the index's
        rows = [json.loads(line) for _, line in zip(range(args.paragraphs + 200), f, strict=False)]
    new_docs = rows[args.paragraphs:]
    t0 = time.perf_counter()
    if not (base / "done").is_file():
        shutil.rmtree(base, ignore_errors=True)
        embed(EmbedJobConfig.model_validate({"corpus": {"path": str(corpus), "id_field": "_id"},
                                             "output": {"path": str(base / "emb"), "num_parts": 2}}))
        index(IndexJobConfig.model_validate({"embeddings": {"path": str(base / "emb")},
                                             "index": {"path": str(base / "index"), "kind": "Flat", "shards": 2}}))
        texts = [json.loads(line)["text"] for line in open(corpus)]
        build_tiny(base / "tiny", texts[:300], TinySpec())
        (base / "done").write_text("")
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    root = run_dir / "index"
    shutil.copytree(base / "index", root)
    model = base / "tiny"
    first = resolve_index(str(root)).uri
    print(f"setup: index {version_name(first)} of {args.paragraphs} paragraphs (Flat, 2 shards) + tiny generator "
          f"in {time.perf_counter() - t0:.0f}s (run folder {run_dir}); {os.cpu_count()} cores, load average "
          f"{load_average()}", flush=True)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    limit = args.request_timeout

    def config(max_concurrent: int) -> ServeJobConfig:
        return ServeJobConfig.model_validate({
            "index": {"path": str(root), "poll_interval_s": None},
            "shards": {"replicas": 2, "health_check_period_s": 1, "layout": args.layout,
                       "fused_in_ingress": IN_INGRESS[args.fused_in_ingress], "threads": args.threads},
            "embedder": {"threads": args.threads},
            "generator": {"model": str(model), "name": "tiny", "defaults": {"max_tokens": args.max_tokens},
                          "threads": args.threads},
            "http": {"port": port, "app_name": APP}, "auth": {"api_keys_env": None},
            "limits": {"request_timeout_s": limit, "max_concurrent_requests": max_concurrent,
                       **({} if args.compute_nice is None else {"compute_nice": args.compute_nice})},
            "serve": {"access_log": False}})

    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": limit + 5})
    cfg = config(args.max_concurrent)
    plan = plan_for(cfg)
    print(f"serving plan: {plan.reason}", flush=True)
    serve.run(build_app(ServeAppArgs(config=cfg.model_dump(mode="json"))), name=APP, route_prefix="/")
    wait_ready(url, 300)
    cap = capacity(url, queries, args)
    print(f"capacity (closed loop): search {cap['search_rps']:.1f} req/s (c16, p99 {cap['search_p99'] * 1e3:.0f} ms), "
          f"chat {cap['chat_rps']:.1f} req/s (c8, p99 {cap['chat_p99'] * 1e3:.0f} ms); the mix with "
          f"{args.chat_share:.0%} chats {cap['mix_rps']:.1f} req/s; failed {cap['failed']}; then the open-loop ramp:",
          flush=True)
    if args.capacity:  # given: the same rates as an earlier run's, for an A/B of two versions of the code
        cap["sustained"] = {"rate": args.capacity, "steps": [], "closed": cap["mix_rps"], "given": True}
    else:
        cap["sustained"] = sustained(lambda: Soak(args, url, root, cfg, queries, new_docs, run_dir), args,
                                     cap["mix_rps"])
    mix = cap["sustained"]["rate"]
    print(f"capacity (open loop, {'given by --capacity' if args.capacity else 'answered in full'}): {mix:.1f} req/s "
          f"({mix / cap['mix_rps']:.2f}x the closed loop); "
          f"limits: request_timeout_s {limit:g}, latency_target_share {cfg.limits.latency_target_share:g}, "
          f"max_concurrent_requests {args.max_concurrent} per replica, compute_nice {cfg.limits.compute_nice}",
          flush=True)

    rate, burst = args.load * mix, args.burst_x * mix
    times = schedule(args.duration, rate, args.burst_at, args.burst_len, burst)
    soak = Soak(args, url, root, cfg, queries, new_docs, run_dir)
    soak.layout = plan.layout if plan.fused_in_ingress else "fused, index apart"
    soak.publish(first)
    print(f"soak: {len(times)} requests over {args.duration:g}s at {rate:.1f} req/s ({args.load:g}x), "
          f"{burst:.1f} req/s ({args.burst_x:g}x) for {args.burst_len:g}s from {spans(args.burst_at)}; update every "
          f"{args.update_every:g}s, kill every {args.kill_every:g}s; load average {load_average()}", flush=True)
    soak.t0 = time.perf_counter()
    soak.sample()
    warm_at = 0.0
    threads = [soak.every(args.sample_every, soak.sample),
               threading.Thread(target=soak.report_windows, daemon=True)]
    threads[-1].start()
    if args.update_every:
        threads.append(soak.every(args.update_every, soak.update))
    if args.kill_every:
        threads.append(soak.every(args.kill_every, soak.kill))
    asyncio.run(soak.drive(times))
    for th in threads:
        th.join(200)
    soak.sample()
    print(f"load average after the soak {load_average()}", flush=True)
    serve.shutdown()
    return finish(soak, args, cap, warm_at, plan.reason, len(times))


def finish(soak: Soak, args: argparse.Namespace, cap: dict, warm_at: float, plan: str, n: int) -> int:
    limit = soak.cfg.limits.request_timeout_s
    windows_burst = [(a, a + args.burst_len + limit) for a in args.burst_at]  # each burst and its queue's drain
    in_burst = [r for r in soak.reqs if any(b0 <= r.t < b1 for b0, b1 in windows_burst)]
    outside = [r for r in soak.reqs if not any(b0 <= r.t < b1 for b0, b1 in windows_burst)]

    def by_status(rs: list[Req]) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in rs:
            out[str(r.status)] = out.get(str(r.status), 0) + 1
        return dict(sorted(out.items()))

    versions: dict[str, int] = {}
    bad_version, stale = [], []
    every_live = set().union(*soak.published.values())
    for r in soak.reqs:
        if r.status != 200:
            continue
        if r.kind == "search":
            versions[str(r.version)] = versions.get(str(r.version), 0) + 1
            live = soak.published.get(str(r.version))
            if live is None:
                bad_version.append(asdict(r))
            elif not set(r.chunks) <= live:
                stale.append(asdict(r))
        elif not set(r.chunks) <= every_live:
            stale.append(asdict(r))
    latest = max(soak.published)
    mem = memory_targets(soak, warm_at, args.warm_s, latest)
    out_bad = [r for r in outside if r.status != 200]
    burst_bad = [r for r in in_burst if r.status not in (200, 429, 503)]
    late = [r for r in in_burst if r.status in (200, 429, 503) and r.latency > limit + 1]
    measured = [m for m in mem if "ok" in m]
    targets = {
        "outside the burst: only 200": (not out_bad, f"{len(outside) - len(out_bad)}/{len(outside)} are 200; "
                                        f"others {by_status(out_bad)}"),
        "burst: only 200, 429, 503": (not burst_bad, f"{by_status(in_burst)}"),
        f"burst: nothing past the limit ({limit:g}s + 1s)": (not late, f"{len(late)} later; slowest "
                                                              f"{max((r.latency for r in in_burst), default=0):.1f}s"),
        "every answer from a published version": (not bad_version and not stale,
                                                  f"{len(bad_version)} unknown versions, {len(stale)} answers with "
                                                  f"chunks not live in their version"),
        "memory within 1.1x of warm-up + added docs": (all(m["ok"] for m in measured) and bool(measured),
                                                       "; ".join(f"{m['deployment']} {m['replica']} "
                                                                 f"{mib(m['warm_anon'])} -> {mib(m['last_anon'])} "
                                                                 f"({m['ratio']:.2f}x, bound {mib(m['bound'])})"
                                                                 for m in measured)),
    }
    windows = [soak.window(w) for w in range(math.ceil(args.duration / WINDOW_S))]
    print(f"\nsoak over: {n} requests; plan {plan}")
    print(f"requests by status: all {by_status(soak.reqs)}; outside the burst {by_status(outside)}; burst window "
          f"{' '.join(f'[{b0:g}, {b1:g})s' for b0, b1 in windows_burst)} {by_status(in_burst)}")
    for kind in ("search", "chat"):
        ok = [r.latency for r in outside if r.kind == kind and r.status == 200]
        print(f"  {kind}: outside the burst p50 {pct(ok, .5) * 1e3:.0f} ms, p99 {pct(ok, .99) * 1e3:.0f} ms")
    print(f"versions that answered searches: {versions}; published {sorted(soak.published)}")
    kills = [e for e in soak.events if e["event"] == "kill"]
    print("kills: " + "; ".join(f"{e['replica']} at {e['t']:.0f}s, back {e.get('recovered_s', float('nan')):.1f}s "
                                f"later" for e in kills))
    for m in mem:
        print(f"  memory {m['deployment']:13s} {m['replica']:10s} pid {m['pid']:7d} life {m['first_s']:5.0f}-"
              f"{m['last_s']:5.0f}s anon: after warm-up {mib(m.get('warm_anon', 0)):>8s}, last "
              f"{mib(m['last_anon']):>8s}, peak {mib(m['peak_anon']):>8s}; rss last {mib(m['last_rss'])}"
              f"{'' if 'ok' in m else '; ' + m['verdict']}")
    print("anonymous memory of each replica over time (MiB):")
    for line in memory_table(soak.samples):
        print("  " + line)
    def near_kill(r: Req) -> bool:  # in flight at a kill, or sent before its replacement ran + the timeout
        end = r.t + (r.latency if r.latency == r.latency else 0.0)
        return any(e["t"] <= end and r.t < e["t"] + e.get("recovered_s", limit) + limit for e in kills)

    at_kill = [r for r in out_bad if near_kill(r)]
    print(f"non-200 outside the burst: {len(out_bad)}; in flight at a kill or sent before its replacement ran + "
          f"{limit:g}s: {by_status(at_kill)}; the rest: {by_status([r for r in out_bad if not near_kill(r)])}")
    for r in out_bad[:10]:
        print(f"  non-200 outside the burst: t {r.t:.1f}s {r.kind} -> {r.status} after {r.latency:.2f}s: {r.body}")
    failed = 0
    print("\ntargets:")
    for name, (passed, figures) in targets.items():
        failed += not passed
        print(f"  {'PASS' if passed else 'FAIL'}  {name}: {figures}")
    result = {"args": vars(args), "plan": plan, "capacity": cap, "requests": n, "status": by_status(soak.reqs),
              "status_outside": by_status(outside), "status_burst": by_status(in_burst), "windows": windows,
              "versions": versions, "published": sorted(soak.published), "events": soak.events,
              "memory": mem, "samples": soak.samples, "non_200": [asdict(r) for r in soak.reqs if r.status != 200],
              "non_200_near_kill": by_status(at_kill), "bad_version": bad_version[:50], "stale": stale[:50],
              "targets": {k: {"pass": ok, "figures": f} for k, (ok, f) in targets.items()}}
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=1, default=str))
    plot(soak, windows, args, f"{args.out}.png")
    print(f"written: {args.out}.json, {args.out}.png")
    return 1 if failed else 0


def plot(soak: Soak, windows: list[dict], args: argparse.Namespace, path: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    ts = [w["t"] + WINDOW_S / 2 for w in windows]
    axes[0].plot(ts, [w["p50"] * 1e3 for w in windows], label="p50")
    axes[0].plot(ts, [w["p99"] * 1e3 for w in windows], label="p99")
    axes[0].set_ylabel("latency of the 200s (ms)")
    axes[0].set_yscale("log")
    statuses = sorted({s for w in windows for s in w["status"]})
    for s in statuses:
        axes[1].plot(ts, [w["status"].get(s, 0) / WINDOW_S for w in windows], label=s)
    axes[1].set_ylabel("responses/s by status")
    for key in sorted({(s["deployment"], s["replica"]) for s in soak.samples}):
        ss = [s for s in soak.samples if (s["deployment"], s["replica"]) == key]
        axes[2].plot([s["t"] for s in ss], [s["anon"] / 2**20 for s in ss], label=f"{key[0]} {key[1]}")
    axes[2].set_ylabel("anonymous memory (MiB)")
    axes[2].set_xlabel("seconds into the soak")
    for ax in axes:
        for a in args.burst_at:
            ax.axvspan(a, a + args.burst_len, color="orange", alpha=0.2)
        for e in soak.events:
            if e["event"] == "kill":
                ax.axvline(e["t"], color="red", ls="--", lw=0.8)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"ragtune soak: {os.cpu_count()} cores; burst shaded, kills dashed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
