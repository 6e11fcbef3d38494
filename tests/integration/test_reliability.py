"""Timeouts, cancellation, environment hygiene, liveness and restarts, through real workers."""

from __future__ import annotations

import asyncio
import os

import pytest

from pyisolate import (
    CallTimeoutError,
    ExtensionBase,
    ExtensionConfig,
    ExtensionManager,
    ExtensionManagerConfig,
)
from tests.support import ext


async def test_a_call_past_its_timeout_fails_and_is_cancelled_remotely(manager):
    e = await manager.load_extension(ExtensionConfig(name="ok", module_path=ext("ok")))
    with pytest.raises(CallTimeoutError, match="wait_for_cancel") as info:
        await e.wait_for_cancel().timeout(0.2)
    assert isinstance(info.value, TimeoutError)
    assert await e.was_cancelled() is True  # its CancelledError ran in the extension
    assert manager.endpoint.late_answers == 1  # the cancelled task's answer came late: dropped, counted
    assert manager.endpoint.pending_calls() == 0
    assert await e.echo("still fine") == "still fine"


async def test_the_configured_default_timeout_applies(venv_root):
    config = ExtensionManagerConfig(venv_root_path=venv_root, call_timeout=0.2)
    async with ExtensionManager(ExtensionBase, config) as manager:
        e = await manager.load_extension(ExtensionConfig(name="ok", module_path=ext("ok")))
        with pytest.raises(CallTimeoutError):
            await e.wait_for_cancel()
        assert await e.was_cancelled() is True
        assert await e.echo(1).timeout(None) == 1


async def test_cancelling_the_caller_cancels_the_remote_task(manager):
    e = await manager.load_extension(ExtensionConfig(name="ok", module_path=ext("ok")))
    call = asyncio.ensure_future(e.wait_for_cancel())
    assert await e.echo(1) == 1  # the call has reached the extension
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    async with asyncio.timeout(10):
        assert await e.was_cancelled() is True
    assert manager.endpoint.pending_calls() == 0


async def test_workers_get_a_clean_environment(manager, monkeypatch):
    monkeypatch.setenv("PYISOLATE_TEST_SECRET", "hunter2")
    monkeypatch.setenv("PYTHONPATH", "/pyisolate-test-pythonpath")
    plain = await manager.load_extension(ExtensionConfig(name="plain-env", module_path=ext("ok")))
    secret, no_user_site, path = await plain.environment("PYISOLATE_TEST_SECRET")
    assert secret is None and no_user_site == 1
    assert "/pyisolate-test-pythonpath" not in path
    assert (await plain.environment("LANG"))[0] == os.environ.get("LANG")
    listed = await manager.load_extension(ExtensionConfig(
        name="listed-env", module_path=ext("ok"), pass_env=["PYISOLATE_TEST_SECRET"], env={"EXTRA": "1"}))
    assert (await listed.environment("PYISOLATE_TEST_SECRET"))[0] == "hunter2"
    assert (await listed.environment("EXTRA"))[0] == "1"


async def test_a_worker_stuck_holding_the_gil_is_detected_and_its_calls_fail(venv_root):
    from pyisolate import ExtensionCrashedError

    config = ExtensionManagerConfig(venv_root_path=venv_root, heartbeat_interval=0.1, heartbeat_timeout=2.0)
    async with ExtensionManager(ExtensionBase, config) as manager:
        stuck = await manager.load_extension(ExtensionConfig(name="stuck", module_path=ext("ok")))
        other = await manager.load_extension(ExtensionConfig(name="other", module_path=ext("ok")))
        pending = asyncio.ensure_future(stuck.wait_for_cancel())
        assert await stuck.echo(1) == 1
        with pytest.raises(ExtensionCrashedError, match="heartbeats") as info:
            async with asyncio.timeout(60):
                await stuck.hold_the_gil()
        with pytest.raises(ExtensionCrashedError):
            await pending
        assert info.value.extension == "stuck" and info.value.exit_code == -9
        assert "holding the GIL" in info.value.stderr_tail
        assert await other.echo("alive") == "alive"  # a healthy worker keeps answering its pings


async def test_a_crashed_extension_restarts_per_its_policy_then_stays_failed(manager):
    from pyisolate import ExtensionCrashedError, RestartPolicy

    policy = RestartPolicy(max_restarts=2, within=600, backoff=0.01)
    e = await manager.load_extension(ExtensionConfig(name="phoenix", module_path=ext("ok"), restart=policy))
    first = await e.pid()
    pending = asyncio.ensure_future(e.wait_for_cancel())
    assert await e.echo(1) == 1
    with pytest.raises(ExtensionCrashedError):
        await e.crash(3)
    with pytest.raises(ExtensionCrashedError):  # at-most-once: a pending call is not replayed
        await pending
    async with asyncio.timeout(60):
        second = await e.pid()  # made during the restart: waits for it
    assert second != first
    with pytest.raises(ExtensionCrashedError):
        await e.crash(3)
    assert await e.pid() not in (first, second)
    with pytest.raises(ExtensionCrashedError):
        await e.crash(3)  # the third crash within the window
    with pytest.raises(ExtensionCrashedError, match="marked failed"):
        await e.echo(1)


async def test_calls_during_a_restart_can_fail_fast(manager):
    from pyisolate import ExtensionCrashedError, RestartPolicy

    policy = RestartPolicy(max_restarts=1, backoff=30, calls_during_restart="fail")
    e = await manager.load_extension(ExtensionConfig(name="fast-fail", module_path=ext("ok"), restart=policy))
    with pytest.raises(ExtensionCrashedError):
        await e.crash(4)
    with pytest.raises(ExtensionCrashedError, match="exited with code 4"):
        await e.echo(1)  # restarting (30 s backoff): fails at once instead of waiting


@pytest.mark.parametrize(("ignore_sigterm", "signal_number"), [(False, 15), (True, 9)])
async def test_the_stop_ladder_ends_a_worker_that_will_not_stop(venv_root, ignore_sigterm, signal_number):
    import signal as signals

    from tests.support import alive

    config = ExtensionManagerConfig(venv_root_path=venv_root, stop_timeout=0.3)
    async with ExtensionManager(ExtensionBase, config) as manager:
        e = await manager.load_extension(ExtensionConfig(name="stubborn", module_path=ext("ok")))
        pid = await e.pid()
        await e.misbehave_on_stop(ignore_sigterm)
        process = manager._extensions["stubborn"].process
        async with asyncio.timeout(10):  # ask (0.3 s), SIGTERM (0.3 s), SIGKILL: bounded
            await e.stop()
        assert not alive(pid)
        assert process.returncode == -signals.Signals(signal_number)


async def test_a_worker_that_exits_without_answering_stop_ends_the_stop_at_once(venv_root, caplog):
    """Its answer to STOP can be lost (many workers stopped at once: the broker's GONE notice
    about one finds another's socket closed first); its exit ends the wait all the same, with
    no warning, long before stop_timeout."""
    config = ExtensionManagerConfig(venv_root_path=venv_root, stop_timeout=600)
    async with ExtensionManager(ExtensionBase, config) as manager:
        e = await manager.load_extension(ExtensionConfig(name="quitter", module_path=ext("ok")))
        await e.set_exit_in_stop()
        process = manager._extensions["quitter"].process
        with caplog.at_level("WARNING", logger="pyisolate"):
            async with asyncio.timeout(60):  # stop_timeout is 600 s: only the exit can end it
                await e.stop()
    assert process.returncode == 0
    assert not [r for r in caplog.records if "did not finish stop()" in r.getMessage()]


@pytest.mark.parametrize("hard_room", [True, False])
async def test_loading_checks_the_fd_headroom_first(venv_root, hard_room):
    """A load raises a low soft RLIMIT_NOFILE before spawning (libzmq would abort the host on
    EMFILE), or, with no room under the hard limit either, fails with ExtensionLoadError."""
    import subprocess
    import sys

    script = f"""
import asyncio, os, resource, sys
import pyisolate
async def main():
    in_use = len(os.listdir("/proc/self/fd"))
    soft = in_use + 40  # room for the broker's own descriptors, not for a worker's spare
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1] if {hard_room} else soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    config = pyisolate.ExtensionManagerConfig(venv_root_path={str(venv_root)!r})
    async with pyisolate.ExtensionManager(pyisolate.ExtensionBase, config) as manager:
        try:
            ext = await manager.load_extension(pyisolate.ExtensionConfig(name="fds", module_path={ext("ok")!r}))
            print("loaded", await ext.echo(1), resource.getrlimit(resource.RLIMIT_NOFILE)[0] > soft)
        except pyisolate.ExtensionLoadError as exc:
            print("refused", "ulimit -n" in str(exc))
asyncio.run(main())
"""
    result = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", script], capture_output=True,
                                     text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == (["loaded", "1", "True"] if hard_room else ["refused", "True"])


async def test_a_call_between_extensions_ends_when_its_target_crashes(manager):
    """Extension -> extension: the caller's pending call fails with the crash, at once (the
    broker tells every worker that an actor left), instead of waiting forever."""
    from shared_api import DatabaseAPI

    from pyisolate import ExtensionCrashedError

    def fanin(name: str) -> ExtensionConfig:
        return ExtensionConfig(name=name, module_path=ext("fanin"), apis=[DatabaseAPI])

    async with asyncio.timeout(120):
        target, caller = await asyncio.gather(manager.load_extension(fanin("target")),
                                              manager.load_extension(fanin("caller")))
    async with asyncio.timeout(60):
        pending = asyncio.ensure_future(caller.call("target", "gate", "caller", 1))
        assert await caller.call("target", "echo", "reached") == "reached"  # the gate call is open
        manager._extensions["target"].process.kill()
        with pytest.raises(ExtensionCrashedError, match="target") as info:
            await pending
        assert info.value.exit_code == -9
        assert await caller.echo("fine") == "fine"


async def test_the_heartbeat_task_survives_a_failing_round(venv_root, monkeypatch):
    """A round of heartbeats that raises (any error at all) does not end liveness checks: a
    worker that hangs later is still found and killed."""
    from pyisolate import ExtensionCrashedError

    config = ExtensionManagerConfig(venv_root_path=venv_root, heartbeat_interval=0.1, heartbeat_timeout=2.0)
    async with ExtensionManager(ExtensionBase, config) as manager:
        e = await manager.load_extension(ExtensionConfig(name="beats", module_path=ext("ok")))
        real_send, failed = manager.broker.send, asyncio.Event()

        def send_once_broken(dest, sender, frames, **kw):
            if not failed.is_set():
                failed.set()
                raise RuntimeError("a send that breaks in a way nobody foresaw")
            return real_send(dest, sender, frames, **kw)

        monkeypatch.setattr(manager.broker, "send", send_once_broken)
        async with asyncio.timeout(30):
            await failed.wait()
        assert not manager._heartbeats.done()
        with pytest.raises(ExtensionCrashedError, match="heartbeats"):
            async with asyncio.timeout(60):
                await e.hold_the_gil()


async def test_a_call_cancelled_before_it_starts_is_still_answered(venv_root):
    """CALL and CANCEL read in one batch (the worker was busy): the call never starts, yet it is
    answered, so its slot comes back; with max_in_flight=2 the next call proceeds."""
    from shared_api import DatabaseAPI

    config = ExtensionManagerConfig(venv_root_path=venv_root, max_in_flight=2)
    async with ExtensionManager(ExtensionBase, config) as manager:
        e = await manager.load_extension(ExtensionConfig(name="busy", module_path=ext("fanin"), apis=[DatabaseAPI]))
        blocking = asyncio.Event()
        manager.on_event("blocking", lambda sender, seconds: blocking.set())
        async with asyncio.timeout(60):
            blocked = asyncio.ensure_future(e.block_loop(1.0))
            await blocking.wait()  # the worker reads nothing until it is done
            doomed = asyncio.ensure_future(e.echo("never runs"))
            await asyncio.sleep(0)  # one turn: the CALL leaves
            doomed.cancel()
            with pytest.raises(asyncio.CancelledError):
                await doomed  # and the CANCEL leaves right behind it
            assert await e.echo("next") == "next"  # needs the cancelled call's slot back
            assert await blocked is True
        assert manager.endpoint.pending_calls() == 0


async def test_a_timeout_raised_by_the_remote_method_is_its_answer(manager):
    """A call with a timeout whose method itself raises TimeoutError gets that error, not
    CallTimeoutError, and nothing is asked to cancel."""
    e = await manager.load_extension(ExtensionConfig(name="ok", module_path=ext("ok")))
    async with asyncio.timeout(60):
        with pytest.raises(TimeoutError, match="the extension's own timeout") as info:
            await e.raise_timeout().timeout(30)
    assert not isinstance(info.value, CallTimeoutError)
    assert manager.endpoint.calls.timeouts == 0


async def test_a_plain_call_past_its_timeout_fails_and_its_late_answer_frees_its_slot(venv_root):
    """A plain method runs in the worker's thread pool and cannot be interrupted: its caller
    gets CallTimeoutError while it blocks; when it ends, its answer is dropped (counted) and
    gives its slot back. With max_in_flight=2, the two calls at the end need that slot."""
    config = ExtensionManagerConfig(venv_root_path=venv_root, max_in_flight=2)
    async with ExtensionManager(ExtensionBase, config) as manager:
        e = await manager.load_extension(ExtensionConfig(name="ok", module_path=ext("ok")))
        async with asyncio.timeout(60):
            with pytest.raises(CallTimeoutError, match="wait_sync"):
                await e.wait_sync().timeout(0.3)
            assert await e.release_sync_waiter() is True
            assert await asyncio.gather(e.echo(1), e.echo(2)) == [1, 2]
        assert manager.endpoint.late_answers == 1
        assert manager.endpoint.pending_calls() == 0


async def test_cancelling_a_running_plain_call_frees_the_caller_and_the_pool_serves_on(venv_root):
    """The caller of a plain method that blocks in its thread cancels: it is free at once, other
    calls are served meanwhile (another thread of the pool), and the method's late answer,
    when it returns, gives its slot back (max_in_flight=2: the last two calls need it)."""
    config = ExtensionManagerConfig(venv_root_path=venv_root, max_in_flight=2)
    async with ExtensionManager(ExtensionBase, config) as manager:
        e = await manager.load_extension(ExtensionConfig(name="ok", module_path=ext("ok")))
        waiting = asyncio.Event()
        manager.on_event("waiting", lambda sender, what: waiting.set())
        async with asyncio.timeout(60):
            call = asyncio.ensure_future(e.wait_sync())
            await waiting.wait()  # running in a pool thread, blocked
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            assert await e.echo("served meanwhile") == "served meanwhile"
            assert await e.release_sync_waiter() is True
            assert await asyncio.gather(e.echo(1), e.echo(2)) == [1, 2]
        assert manager.endpoint.late_answers == 1
        assert manager.endpoint.pending_calls() == 0
