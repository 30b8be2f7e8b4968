"""Dynamic batching that forms a batch when its worker is free (self-clocking), for work run on a thread pool.

Serve's ``@serve.batch`` forms its next batch as soon as the last one has *started*: while a forward pass runs on
the replica's compute thread, the event loop goes on taking the one or two requests that arrived in each
``batch_wait_timeout_s`` as batches of their own, which then wait for the thread one after another. Profiled in
the fused Ingress on 2 cores (``bench/serve.py``, 32 concurrent searches), the encoder's batches averaged 2
queries, and each query cost the replica ~12 ms of forward pass where a batch of 32 costs ~3 ms a query.

:class:`Batcher` takes the next batch only once the last one has finished: everything that queued meanwhile, up
to ``max_batch_size``, goes in one call. A batcher that was idle waits up to ``wait_s`` after the first call for
more to join (as ``@serve.batch`` does). Calls whose caller gave up (cancelled: its timeout, its client gone)
before their batch was taken are left out of it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class Batcher(Generic[In, Out]):
    """``await batcher(item)``: ``fn`` (a list of items -> their results, in order) runs on ``pool`` over the
    items of concurrent calls, one batch at a time, at most ``max_batch_size`` items each; an idle batcher waits
    up to ``wait_s`` seconds for a batch to fill. An exception of ``fn`` is raised in every call of its batch.

    One event loop at a time (a replica's); a batcher left behind by a loop that ended starts afresh on the next.
    """

    def __init__(self, fn: Callable[[list[In]], Sequence[Out]], pool: Executor, max_batch_size: int,
                 wait_s: float):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.fn, self.pool, self.max_batch_size, self.wait_s = fn, pool, max_batch_size, wait_s
        self.queue: deque[tuple[In, asyncio.Future[Out]]] = deque()
        self.runner: asyncio.Task[None] | None = None
        self.full: asyncio.Event | None = None  # set when the queue holds a whole batch (ends the idle wait)
        self.loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, item: In) -> Out:
        loop = asyncio.get_running_loop()
        if loop is not self.loop:  # first call, or a new loop: nothing queued on the old one can be answered
            self.loop, self.runner, self.full = loop, None, asyncio.Event()
            self.queue.clear()
        future: asyncio.Future[Out] = loop.create_future()
        self.queue.append((item, future))
        if len(self.queue) >= self.max_batch_size:
            assert self.full is not None
            self.full.set()
        if self.runner is None or self.runner.done():
            self.runner = loop.create_task(self._run())
        return await future

    def _take(self) -> list[tuple[In, asyncio.Future[Out]]]:
        batch: list[tuple[In, asyncio.Future[Out]]] = []
        while self.queue and len(batch) < self.max_batch_size:
            item, future = self.queue.popleft()
            if not future.done():  # its caller gave up: not computed
                batch.append((item, future))
        return batch

    async def _run(self) -> None:
        assert self.full is not None
        loop = asyncio.get_running_loop()
        if self.wait_s > 0 and len(self.queue) < self.max_batch_size:  # idle until now: let a batch form
            waiter = asyncio.ensure_future(self.full.wait())  # (not wait_for: on 3.11 it can swallow a cancel)
            try:
                await asyncio.wait({waiter}, timeout=self.wait_s)
            finally:
                waiter.cancel()
        while batch := self._take():
            self.full.clear()
            try:
                out = await loop.run_in_executor(self.pool, self.fn, [item for item, _ in batch])
                if len(out) != len(batch):
                    raise RuntimeError(f"a batch of {len(batch)} items gave {len(out)} results")
            except asyncio.CancelledError:  # the loop is ending: nothing will answer what still waits
                for _, future in [*batch, *self.queue]:
                    future.cancel()
                self.queue.clear()
                raise
            except Exception as e:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future), result in zip(batch, out, strict=True):
                if not future.done():
                    future.set_result(result)
