"""serving.batching.Batcher: the next batch is taken when the last one has finished (what queued meanwhile, up to
max_batch_size, in one call), an idle batcher waits for a batch to fill, errors and give-ups stay with their
calls. No Ray: the batcher is plain asyncio over a thread pool."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from serving.batching import Batcher


class _Recorder:
    """A batch function that records its batches; the first one blocks until ``release`` is set."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.started, self.release = threading.Event(), threading.Event()

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.started.set()
        self.release.wait(5)
        if any(i < 0 for i in items):
            raise ValueError(f"negative item in {items}")
        return [10 * i for i in items]


async def _first_running(batcher: Batcher, rec: _Recorder) -> asyncio.Task:
    """Start one call and wait until its batch is running on the pool."""
    first = asyncio.ensure_future(batcher(0))
    await asyncio.get_running_loop().run_in_executor(None, rec.started.wait, 5)
    return first


@pytest.fixture
def pool():
    with ThreadPoolExecutor(max_workers=1) as p:
        yield p


def test_what_queues_while_a_batch_runs_is_the_next_batch_up_to_its_size(pool):
    rec = _Recorder()
    batcher = Batcher(rec, pool, max_batch_size=4, wait_s=0.0)

    async def main():
        first = await _first_running(batcher, rec)
        rest = [asyncio.ensure_future(batcher(i)) for i in range(1, 10)]
        await asyncio.sleep(0.05)  # the pool is busy: nothing more runs, whatever the wait
        assert rec.batches == [[0]]
        rec.release.set()
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(main())
    assert first == 0 and rest == [10 * i for i in range(1, 10)]
    assert rec.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]  # in order, never over max_batch_size


def test_an_idle_batcher_waits_for_a_batch_to_fill(pool):
    rec = _Recorder()
    rec.release.set()
    batcher = Batcher(rec, pool, max_batch_size=8, wait_s=0.5)

    async def main():
        calls = []
        for i in range(3):  # arrive one after another, within the wait
            calls.append(asyncio.ensure_future(batcher(i)))
            await asyncio.sleep(0.01)
        return await asyncio.gather(*calls)

    assert asyncio.run(main()) == [0, 10, 20]
    assert rec.batches == [[0, 1, 2]]


def test_a_full_batch_does_not_wait(pool):
    rec = _Recorder()
    rec.release.set()
    batcher = Batcher(rec, pool, max_batch_size=2, wait_s=30.0)

    async def main():
        return await asyncio.wait_for(asyncio.gather(batcher(1), batcher(2)), 5)

    assert asyncio.run(main()) == [10, 20]
    assert rec.batches == [[1, 2]]


def test_an_error_fails_its_own_batch_only(pool):
    rec = _Recorder()
    batcher = Batcher(rec, pool, max_batch_size=2, wait_s=0.0)

    async def main():
        first = await _first_running(batcher, rec)
        bad = [asyncio.ensure_future(batcher(i)) for i in (1, -1)]
        good = asyncio.ensure_future(batcher(3))
        rec.release.set()
        out = await asyncio.gather(*bad, return_exceptions=True)
        return await first, out, await good

    first, bad, good = asyncio.run(main())
    assert first == 0 and good == 30
    assert all(isinstance(e, ValueError) and "negative item" in str(e) for e in bad)
    assert rec.batches == [[0], [1, -1], [3]]


def test_a_call_given_up_before_its_batch_is_left_out(pool):
    rec = _Recorder()
    batcher = Batcher(rec, pool, max_batch_size=8, wait_s=0.0)

    async def main():
        first = await _first_running(batcher, rec)
        gone = asyncio.ensure_future(batcher(1))
        kept = asyncio.ensure_future(batcher(2))
        await asyncio.sleep(0)
        gone.cancel()
        rec.release.set()
        return await first, await kept, gone.cancelled()

    assert asyncio.run(main()) == (0, 20, True)
    assert rec.batches == [[0], [2]]


def test_a_batch_function_that_loses_results_is_an_error(pool):
    batcher = Batcher(lambda items: items[:-1], pool, max_batch_size=4, wait_s=0.05)

    async def main():
        return await asyncio.gather(batcher(1), batcher(2), return_exceptions=True)

    out = asyncio.run(main())
    assert all(isinstance(e, RuntimeError) and "2 items gave 1 results" in str(e) for e in out)


def test_a_new_event_loop_gets_a_fresh_batcher(pool):
    rec = _Recorder()
    rec.release.set()
    batcher = Batcher(rec, pool, max_batch_size=4, wait_s=0.0)
    assert asyncio.run(batcher(1)) == 10
    assert asyncio.run(batcher(2)) == 20  # a second loop (a test's second asyncio.run): answered, not stuck
    with pytest.raises(ValueError, match="max_batch_size must be at least 1"):
        Batcher(rec, pool, max_batch_size=0, wait_s=0.0)
