"""The hand-offs between threads and the loop: the plain methods' pool, and ``block`` (pyisolate.sync).

Real threads and a real loop; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from pyisolate._rpc.blocking import block
from pyisolate._rpc.pool import Pool

WAIT = 30.0  # the longest any wait of these tests may take


@pytest.fixture
def pool() -> Iterator[Pool]:
    p = Pool("test", max_threads=2)
    yield p
    p.close()


def test_a_slow_job_does_not_hold_up_the_next(pool: Pool) -> None:
    release, second_ran = threading.Event(), threading.Event()
    pool.submit(lambda: release.wait(WAIT))
    pool.submit(second_ran.set)
    assert second_ran.wait(WAIT)  # ran on another thread while the first still blocks
    release.set()


def test_a_queued_job_is_withdrawn_by_cancel_and_never_runs(pool: Pool) -> None:
    release = threading.Event()
    started = [threading.Event(), threading.Event()]
    for event in started:  # both threads busy: the pool is at its bound
        pool.submit(lambda e=event: (e.set(), release.wait(WAIT)))
    assert all(e.wait(WAIT) for e in started)
    ran: list[str] = []
    queued = pool.submit(lambda: ran.append("withdrawn"))
    after = threading.Event()
    pool.submit(after.set)
    assert queued.cancel() is True
    release.set()
    assert after.wait(WAIT)  # queued behind the withdrawn one: it has been taken and dropped
    assert ran == []
    assert queued.cancel() is False  # once only


def test_a_running_job_cannot_be_withdrawn(pool: Pool) -> None:
    started, release, done = threading.Event(), threading.Event(), threading.Event()
    job = pool.submit(lambda: (started.set(), release.wait(WAIT), done.set()))
    assert started.wait(WAIT)
    assert job.cancel() is False
    release.set()
    assert done.wait(WAIT)


def test_close_withdraws_what_no_thread_has_taken() -> None:
    pool = Pool("closing", max_threads=1)
    started, release = threading.Event(), threading.Event()
    pool.submit(lambda: (started.set(), release.wait(WAIT)))
    assert started.wait(WAIT)
    queued = pool.submit(lambda: None)
    pool.close()
    assert queued.cancel() is False  # withdrawn by close()
    release.set()
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(lambda: None)


async def test_run_awaits_the_result_or_the_exception_in_the_callers_context(pool: Pool) -> None:
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var")
    var.set("caller's")
    async with asyncio.timeout(WAIT):
        name, value, x = await pool.run(lambda x: (threading.current_thread().name, var.get(), x), 5)
        assert (name.startswith("pyisolate-test_"), value, x) == (True, "caller's", 5)
        with pytest.raises(ZeroDivisionError):
            await pool.run(lambda: 1 / 0)


@pytest.fixture
def loop_thread() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(WAIT)
    loop.close()


def test_block_returns_the_result_or_raises_the_exception(loop_thread: asyncio.AbstractEventLoop) -> None:
    async def answer(x: int) -> int:
        await asyncio.sleep(0)
        return x * 2

    async def fail() -> None:
        raise KeyError("missing")

    assert block(loop_thread, "answer()", answer(21)) == 42
    with pytest.raises(KeyError, match="missing"):
        block(loop_thread, "fail()", fail())


def test_many_threads_blocking_at_once_each_get_their_own_answer(loop_thread: asyncio.AbstractEventLoop) -> None:
    async def answer(x: object) -> object:
        await asyncio.sleep(0)
        return x

    results: dict[int, list[object]] = {}

    def caller(t: int) -> None:
        results[t] = [block(loop_thread, "answer()", answer((t, i))) for i in range(200)]

    threads = [threading.Thread(target=caller, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert results == {t: [(t, i) for i in range(200)] for t in range(8)}


def test_a_thread_that_stops_waiting_cancels_the_task(loop_thread: asyncio.AbstractEventLoop) -> None:
    cancelled = threading.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(TimeoutError, match="forever"):
        block(loop_thread, "forever()", forever(), timeout=0.2)
    assert cancelled.wait(WAIT)
