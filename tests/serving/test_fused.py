"""The fused layout's IndexReplica (its class, without Serve) and the batched search it runs (serving.rag.search_many)
on a synthetic index with BM25 shards: many queries searched together equal each searched alone, and the
docstore is read off the event loop. The app in both layouts: tests/serving/test_app.py."""

import asyncio
import threading
import time

import numpy as np
import pytest

from tests.serving.test_rag import MODE_CASES, _Encoder, texts_index  # noqa: F401 (a module fixture)


def test_search_many_equals_each_query_alone_across_modes_depths_and_fusions(texts_index):  # noqa: F811
    from serving.rag import Query, make_fusion, search_many
    from sharding.search import ShardedIndex, search

    index = ShardedIndex.open(texts_index["path"])
    xq, texts = texts_index["xq"], texts_index["queries"]
    # a batch that mixes every mode, two candidate counts and the fusion overrides: one search per group of them
    cases = [(mode, kk, make_fusion(None, overrides)) for mode, overrides in MODE_CASES for kk in (5, 150)]
    queries = [Query(texts[n % len(texts)], *cases[n % len(cases)]) for n in range(3 * len(cases))]
    rows = np.stack([xq[n % len(texts)] for n in range(len(queries))])
    got = search_many(index, rows, queries)
    for n, q in enumerate(queries):
        D, I = search(index, rows[n:n + 1], [q.text], q.kk, q.mode, q.fusion)
        assert np.array_equal(got[n][1], I[0]) and np.allclose(got[n][0], D[0], atol=1e-5), (q.mode, q.kk)
    lexical = [Query(t, "lexical", 5, make_fusion(None)) for t in texts]
    assert all(np.array_equal(i, search(index, None, [t], 5, "lexical")[1][0])
               for (_, i), t in zip(search_many(index, None, lexical), texts, strict=True))


class _StandIn(_Encoder):
    """QueryEncoder stand-in for the synthetic index (no model): its query vectors, a token per word."""

    def __init__(self, manifest, batch_size):
        super().__init__(_StandIn.queries, _StandIn.xq)
        self.dim = manifest.dim

    def count_tokens(self, texts):
        return [len(t.split()) for t in texts]


@pytest.fixture
def replica(texts_index, monkeypatch):  # noqa: F811
    """An IndexReplica over the synthetic index (hybrid by default), batches of up to 16 queries."""
    import serving.deployments as dep
    from cluster.placement import ReplicaResources
    from configs.schema.serve import EmbedderConfig, IndexSource, RetrievalConfig
    from serving.fused import IndexReplica

    _StandIn.queries, _StandIn.xq = texts_index["queries"], texts_index["xq"]
    monkeypatch.setattr(dep, "QueryEncoder", _StandIn)
    return IndexReplica(IndexSource(path=texts_index["path"], poll_interval_s=None),
                                      EmbedderConfig(max_batch_size=16, batch_wait_timeout_s=0.05),
                                      RetrievalConfig(mode="auto", filter_overfetch=3),
                                      ReplicaResources(1, 0, 1, "cpu"))


def test_concurrent_searches_are_batched_and_equal_one_search_each(replica, texts_index):  # noqa: F811
    """Every mode at once, in one event loop (a batcher serves one loop at a time: one replica per process, as in
    Serve)."""
    import serving.fused as fused
    from serving.rag import make_fusion
    from sharding.search import ShardedIndex, search

    version = next(iter(replica.held.versions))
    queries = texts_index["queries"]
    threads, calls, reads = [], [], []
    real_passages, real_jobs = fused.read_passages, fused.search_jobs

    def spy_passages(docstores, batch):
        threads.append(threading.current_thread().name)
        reads.append(len(batch))
        return real_passages(docstores, batch)

    def spy_jobs(jobs):
        calls.append(len(jobs))
        return real_jobs(jobs)

    async def ask(mode, overrides):
        plain = [replica.search(version, q, 4, None, mode, overrides) for q in queries]
        filtered = [replica.search(version, q, 4, {"lang": "de"}, mode, overrides) for q in queries[:4]]
        return await asyncio.gather(*plain, *filtered)

    async def every_mode():
        return [await ask(mode, overrides) for mode, overrides in MODE_CASES], threading.current_thread().name

    fused.read_passages, fused.search_jobs = spy_passages, spy_jobs
    try:
        answers, loop_thread = asyncio.run(every_mode())
    finally:
        fused.read_passages, fused.search_jobs = real_passages, real_jobs
    full = ShardedIndex.open(texts_index["path"])
    for (mode, overrides), results in zip(MODE_CASES, answers, strict=True):
        fusion = make_fusion(None, overrides)
        for n, q in enumerate(queries):
            D, I = search(full, texts_index["xq"][n:n + 1], [q], 4, mode, fusion)
            got = results[n]
            assert got.mode == mode and got.version == version
            assert [p.chunk_id for p in got.passages] == [c for c in I[0].tolist() if c >= 0], (mode, q)
            assert np.allclose([p.score for p in got.passages], D[0][I[0] >= 0], atol=1e-5)
        for got in results[len(queries):]:  # a filter: only passing passages, widened as the Retriever widens
            assert got.passages and all(p.metadata["lang"] == "de" for p in got.passages)
        if mode != "lexical":
            assert max(r.embed_batch for r in results) > 1  # many queries per forward pass
        else:
            assert all(r.embed_batch == 0 for r in results)  # lexical embeds nothing
    assert max(calls) > 1 and sum(calls) >= sum(len(r) for r in answers)  # many queries per search call
    assert max(reads) > 1 and sum(reads) >= sum(len(r) for r in answers)  # many queries per docstore read
    assert threads and all(t.startswith("docstore") and t != loop_thread for t in threads)


def test_a_burst_of_searches_gives_its_freed_memory_back_once_it_is_over(replica, texts_index):  # noqa: F811
    """Apart (no Ingress's admission in its process), the replica trims its own heap after a burst of searches."""
    from serving.deployments import BURST, give_back_in_background

    assert replica.bursts.over is give_back_in_background
    calls = []
    replica.bursts.over = lambda: calls.append(replica.bursts.in_flight)
    replica.bursts.every_s = float("inf")  # the burst rule alone (the 30-second one has its own test)
    version, queries = next(iter(replica.held.versions)), texts_index["queries"]

    async def searches(n):
        return await asyncio.gather(*[replica.search(version, queries[i % len(queries)], 4) for i in range(n)])

    asyncio.run(searches(BURST - 1))  # below a burst: never
    assert calls == []
    answers = asyncio.run(searches(2 * BURST))  # 128 at once: called once, when 16 are left
    assert calls == [16] and replica.bursts.in_flight == 0
    assert all(a.passages for a in answers)


def test_a_reload_loads_the_new_version_then_the_pointer_switches(replica, texts_index, tmp_path):  # noqa: F811
    """The fused layout's reload: the Ingress's VersionPointer has a replica prepare the new version (shards and
    docstore), then switches; a version the mode cannot serve is a 409 and the old one keeps serving."""
    import shutil

    from configs.errors import Conflict
    from configs.schema.serve import IndexSource
    from serving.versions import VersionPointer
    from sharding.manifest import read_index_manifest, switch_latest, write_index_manifest
    from sharding.storage import resolve

    root = tmp_path / "index"
    for name in ("v-00001", "v-00009"):  # two versions of the same chunks
        shutil.copytree(resolve(texts_index["path"]).path, root / name)
        m = read_index_manifest(resolve(str(root / name)))
        write_index_manifest(resolve(str(root / name)), m.model_copy(update={"version": name}))
    switch_latest(resolve(str(root)), "v-00001")
    pointer = VersionPointer(IndexSource(path=str(root), poll_interval_s=None), "hybrid")

    async def prepare(version, manifest):
        await replica.prepare(version)

    async def reload():
        return await pointer.reload(prepare)

    assert not asyncio.run(reload()).changed
    switch_latest(resolve(str(root)), "v-00009")
    out = asyncio.run(reload())
    assert out.changed and out.version == "v-00009" and out.previous == "v-00001"  # names, never paths
    assert pointer.version == resolve(str(root / "v-00009")).uri
    assert pointer.version in replica.held.versions and pointer.version in replica.docstores.stores
    health = asyncio.run(replica.ready(pointer.version))
    assert health.ready and health.shards == 3 and health.loaded == [0, 1, 2]

    shutil.copytree(root / "v-00009", root / "v-00010")
    shutil.rmtree(root / "v-00010" / "lexical")
    m = read_index_manifest(resolve(str(root / "v-00010")))
    write_index_manifest(resolve(str(root / "v-00010")), m.model_copy(update={"lexical": None, "version": "v-00010"}))
    switch_latest(resolve(str(root)), "v-00010")
    with pytest.raises(Conflict, match="retrieval.mode = 'hybrid' needs a lexical"):
        asyncio.run(reload())
    assert pointer.version.endswith("v-00009")


def test_the_board_keeps_the_fused_replicas_on_one_version(tmp_path, monkeypatch):
    """Three fused replicas (their version pointers and board loops, in one event loop; the board called as a
    handle would be): a reload on one answers once the others have loaded and switched too; a replica that cannot
    load the new version is waited for only PUBLISH_WAIT_S, keeps its old version and is named; a replica that
    stopped following is not waited for."""
    import shutil

    from configs.schema.serve import IndexSource
    from serving import fused
    from serving.fused import Local, VersionBoard, follow_board
    from serving.versions import VersionPointer
    from sharding.manifest import read_index_manifest, switch_latest, write_index_manifest
    from sharding.storage import resolve
    from tests.serving.test_rag import build_texts_version

    monkeypatch.setattr(fused, "FOLLOW_S", 0.2)
    monkeypatch.setattr(fused, "LIVE_S", 3.0)  # longer than c's backoff (1 s, 2 s) between failed loads
    monkeypatch.setattr(fused, "actor_alive", lambda name: True)  # "a", "b", "c" name no actor of the test's Ray
    monkeypatch.setattr(fused, "PUBLISH_WAIT_S", 1.5)
    root = tmp_path / "index"
    built, _, _ = build_texts_version(tmp_path / "one", ["alpha", "beta", "gamma"], 1, lexical=False)
    for name in ("v-00001", "v-00002"):
        shutil.copytree(resolve(built).path, root / name)
        m = read_index_manifest(resolve(str(root / name)))
        write_index_manifest(resolve(str(root / name)), m.model_copy(update={"version": name}))
    switch_latest(resolve(str(root)), "v-00001")
    v2 = resolve(str(root / "v-00002")).uri
    source = IndexSource(path=str(root), poll_interval_s=None)
    board = Local(VersionBoard.func_or_class())
    loaded: dict[str, list[str]] = {"a": [], "b": [], "c": []}

    def prepare_for(name, fails=False):
        async def prepare(version, manifest):
            await asyncio.sleep(0.05)  # loading takes a while
            if fails:
                raise RuntimeError("no room")
            loaded[name].append(version)
        return prepare

    async def scenario():
        async def publish(version):
            return await board.publish.remote(version)

        pointers = {n: VersionPointer(source, "dense", on_switch=publish) for n in "abc"}
        synced = {n: asyncio.Event() for n in "abc"}
        loops = {n: asyncio.create_task(follow_board(board, pointers[n], n, prepare_for(n, fails=n == "c"),
                                                     synced[n])) for n in "abc"}
        for e in synced.values():
            await e.wait()
        switch_latest(resolve(str(root)), "v-00002")
        t0 = time.monotonic()
        out = await pointers["a"].reload(prepare_for("a"))
        waited = time.monotonic() - t0
        versions = {n: p.version for n, p in pointers.items()}
        loops["c"].cancel()  # c stops following: after LIVE_S it is no longer waited for
        await asyncio.sleep(3.2)
        t1 = time.monotonic()
        again = await pointers["a"].reload(prepare_for("a"))
        for task in loops.values():
            task.cancel()
        return out, waited, versions, again, time.monotonic() - t1

    out, waited, versions, again, waited_again = asyncio.run(scenario())
    assert out.changed and out.version == "v-00002"
    assert versions["a"] == versions["b"] == v2 and loaded["a"] == loaded["b"] == [v2]  # b switched before the
    assert versions["c"].endswith("v-00001") and loaded["c"] == []                       # reload answered
    assert 1.4 < waited < 5  # it waited PUBLISH_WAIT_S for c, which cannot load it, then answered anyway
    assert not again.changed and waited_again < 0.5  # c is gone: nobody is behind


def test_with_the_index_apart_a_published_version_is_loaded_by_every_index_replica_before_publish_answers(
        monkeypatch):
    """The index apart: the IndexReplica replicas follow the board (``follow_versions``); the Ingress publishes a
    version after one replica loaded it, and the publish answers once every replica has loaded it too, so that
    no search of the new version waits for a replica to load it. A replica that cannot load it is named after
    PUBLISH_WAIT_S and keeps trying."""
    from serving import fused
    from serving.fused import Local, VersionBoard, follow_versions

    monkeypatch.setattr(fused, "FOLLOW_S", 0.2)
    monkeypatch.setattr(fused, "actor_alive", lambda name: True)  # "a", "b", "c" name no actor of the test's Ray
    monkeypatch.setattr(fused, "PUBLISH_WAIT_S", 1.0)
    board = Local(VersionBoard.func_or_class())
    loaded: dict[str, list[str]] = {"a": [], "b": [], "c": []}

    def load_for(name):
        async def load(version):
            await asyncio.sleep(0.1)  # loading takes a while
            if name == "c" and version == "v-3":
                raise RuntimeError("no room")
            loaded[name].append(version)
        return load

    async def scenario():
        loops = [asyncio.create_task(follow_versions(board, n, "v-1", load_for(n))) for n in "abc"]
        await asyncio.sleep(0.1)  # each has told the board what it holds
        t0 = time.monotonic()
        behind = await board.publish.remote("v-2")
        took, at_answer = time.monotonic() - t0, {n: list(v) for n, v in loaded.items()}
        t1 = time.monotonic()
        behind3 = await board.publish.remote("v-3")
        took3 = time.monotonic() - t1
        for task in loops:
            task.cancel()
        return behind, took, at_answer, behind3, took3

    behind, took, at_answer, behind3, took3 = asyncio.run(scenario())
    assert behind == [] and at_answer == {"a": ["v-2"], "b": ["v-2"], "c": ["v-2"]} and 0.1 <= took < 1.0
    assert behind3 == ["c"] and 1.0 <= took3 < 3  # c cannot load it: named once PUBLISH_WAIT_S is over


def test_a_reload_does_not_wait_for_a_replica_killed_while_it_was_behind(monkeypatch):
    """A replica killed as a reload starts (the soak's kill and update at the same second) was heard from lately,
    so it counted as live for LIVE_S and the reload waited PUBLISH_WAIT_S for it, past the request timeout (three
    504s): a replica whose actor is gone is not waited for; one alive but behind still is."""
    from serving import fused
    from serving.fused import Local, VersionBoard

    monkeypatch.setattr(fused, "FOLLOW_S", 0.2)
    monkeypatch.setattr(fused, "PUBLISH_WAIT_S", 1.0)  # LIVE_S stays 60 s: c was heard from a moment ago
    dead: set[str] = set()
    monkeypatch.setattr(fused, "actor_alive", lambda name: name not in dead)

    async def follower(board, name):
        have = "v-1"
        while True:  # switches to whatever the board names, at once
            have = await board.follow.remote(name, have)

    async def scenario(killed):
        board = Local(VersionBoard.func_or_class())
        loops = [asyncio.create_task(follower(board, n)) for n in "ab"]
        await board.follow.remote("c", "v-1")  # c is heard from once, then stops (killed, or hung)
        await asyncio.sleep(0.05)
        dead.clear()
        dead.update({"c"} if killed else set())
        t0 = time.monotonic()
        behind = await board.publish.remote("v-2")
        for task in loops:
            task.cancel()
        return behind, time.monotonic() - t0

    behind, took = asyncio.run(scenario(killed=True))
    assert behind == [] and took < 0.5
    behind, took = asyncio.run(scenario(killed=False))  # alive but not following: waited for, then named
    assert behind == ["c"] and 0.9 < took < 3


@pytest.mark.integration
def test_actor_alive_tells_a_killed_replica_from_a_live_one(ray_2_cpus):
    import os
    import signal

    from serving.fused import actor_alive

    @ray_2_cpus.remote(num_cpus=0)
    class Replica:
        def pid(self):
            return os.getpid()

    actor = Replica.options(name="SERVE_REPLICA::test#Ingress#x1", lifetime="detached").remote()
    pid = ray_2_cpus.get(actor.pid.remote())
    assert actor_alive("SERVE_REPLICA::test#Ingress#x1") and not actor_alive("SERVE_REPLICA::test#Ingress#none")
    os.kill(pid, signal.SIGKILL)  # as the soak kills a replica
    deadline = time.monotonic() + 10
    while actor_alive("SERVE_REPLICA::test#Ingress#x1") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not actor_alive("SERVE_REPLICA::test#Ingress#x1")


def test_a_new_replica_hears_the_boards_version_at_once_and_then_long_polls(monkeypatch):
    """A replica (a replacement after a crash) answers no search before the board has answered it once: that
    first answer must not wait the long poll's FOLLOW_S (requests sent to a fresh replica timed out behind it)."""
    from serving import fused
    from serving.fused import Local, VersionBoard

    monkeypatch.setattr(fused, "FOLLOW_S", 2.0)
    board = Local(VersionBoard.func_or_class())

    async def scenario():
        t0 = time.monotonic()
        first = await board.follow.remote("a", "v-1")  # the board's first replica: its version becomes the board's
        second = await board.follow.remote("b", "v-1")  # a new replica at the same version
        quick = time.monotonic() - t0
        t1 = time.monotonic()
        again = await board.follow.remote("b", "v-1")  # known: a long poll, answered after FOLLOW_S
        return first, second, quick, again, time.monotonic() - t1

    first, second, quick, again, polled = asyncio.run(scenario())
    assert first == second == again == "v-1"
    assert quick < 0.5 and 1.8 < polled < 4
