"""Remote workers over tcp + CURVE on loopback, against bare pyzmq tcp + CURVE in the same run.

The floors, on tcp://127.0.0.1 with the same encryption: for small calls, the suite's bare
floor (``floors.DirectFloor("bare")``: an asyncio ROUTER driven by ``add_reader`` and a msgpack
echo DEALER in another process) with CURVE on both ends; for 64 MiB, a ROUTER here and a DEALER
in a child process that echoes every message back at once, zero-copy both ways. What the
transport alone costs. pyisolate: a manager listening on loopback with
CURVE, its extension run by `pyisolate worker --connect ...` (a separate process that joined
through the listener), called with a small value and with a 64 MiB tensor that comes back
(as buffer frames: a remote worker shares no memory with the host).

    python benchmarks/remote.py [--quick]
"""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import floors  # noqa: E402

import pyisolate  # noqa: E402
from pyisolate._curve import create_key_files  # noqa: E402

REMOTE_EXT = Path(__file__).resolve().parent / "remote_ext"
TENSOR_BYTES = 64 << 20

#: The floor's echo peer: a CURVE client that sends back every message as it came.
_ECHO = """
import sys, zmq
ctx = zmq.Context()
s = ctx.socket(zmq.DEALER)
s.curve_serverkey, s.curve_publickey, s.curve_secretkey = (k.encode() for k in sys.argv[2:5])
s.connect(sys.argv[1])
s.send(b"ready")
while True:
    frames = s.recv_multipart(copy=False)
    if frames[0].bytes == b"quit":
        break
    s.send_multipart(frames, copy=False)
s.close(linger=0)
ctx.term()
"""


#: The floors' echo DEALER (``floors.ECHO``), made a CURVE client with the keys in argv[2:5].
_CURVE_ECHO = floors.ECHO.replace(
    "if len(sys.argv) > 2: s.setsockopt(zmq.IDENTITY, sys.argv[2].encode())",
    "s.curve_serverkey, s.curve_publickey, s.curve_secretkey = (k.encode() for k in sys.argv[2:5])")
assert _CURVE_ECHO != floors.ECHO


class CurveFloor(floors.DirectFloor):
    """``floors.DirectFloor`` over tcp://127.0.0.1 with CURVE: the same asyncio ROUTER (``style``
    "asyncio": zmq.asyncio, the floor local calls are measured against; "bare": add_reader) and
    msgpack echo DEALER, encrypted."""

    def __init__(self, style: str, host: tuple[str, str], worker: tuple[str, str]) -> None:
        super().__init__(style)
        import zmq

        self.sock.curve_server = True  # for the tcp endpoint bound next (the ipc one stays unused)
        self.sock.curve_secretkey = host[1].encode()
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.keys = (host[0], *worker)

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _CURVE_ECHO, self.endpoint,
                                                         *self.keys, stdout=asyncio.subprocess.PIPE)
        if self.style == "asyncio":
            self.rid = (await self.sock.recv_multipart())[0]
            self.reader = asyncio.create_task(self._read())
            return
        ready: asyncio.Future[bytes] = self.loop.create_future()
        self.pending[0] = ready
        self.fd = self.sock.getsockopt(floors.zmq.FD)
        self.loop.add_reader(self.fd, self._drain)
        self.rid = await ready


class BlobFloor:
    """A ROUTER here (blocking calls, run in a thread) and a child DEALER that echoes each message
    back zero-copy: the 64 MiB round trip's floor."""

    def __init__(self, host: tuple[str, str], worker: tuple[str, str]) -> None:
        import zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.curve_server = True
        self.sock.curve_secretkey = host[1].encode()
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.child = subprocess.Popen([sys.executable, "-c", _ECHO, endpoint, host[0], *worker])
        self.rid = self.sock.recv_multipart()[0]
        self.payload = bytes(TENSOR_BYTES)

    def round_trip(self) -> float:
        start = time.perf_counter()
        self.sock.send_multipart([self.rid, b"x", self.payload], copy=False)
        self.sock.recv_multipart(copy=False)
        return (time.perf_counter() - start) * 1e6

    def close(self) -> None:
        try:
            self.sock.send_multipart([self.rid, b"quit"])
            self.child.wait(timeout=30)
        finally:
            if self.child.poll() is None:
                self.child.kill()
                self.child.wait()
            self.sock.close(linger=0)
            self.ctx.term()


async def measure(work: Path, quick: bool) -> list[common.Result]:
    if importlib.util.find_spec("torch") is None:
        print("remote: skipped, torch is not installed", file=sys.stderr)
        return []
    work.mkdir(parents=True, exist_ok=True)
    # Keys made for this run alone (key files are never overwritten), gone with it.
    with tempfile.TemporaryDirectory(prefix="remote-keys-", dir=work) as key_dir:
        return await _measure(work, quick, Path(key_dir))


async def _measure(work: Path, quick: bool, key_dir: Path) -> list[common.Result]:
    import torch

    count, reps = (1500, 5) if quick else (6000, 20)
    _, host_secret, host = create_key_files(key_dir, "host")
    worker_public, worker_secret, worker = create_key_files(key_dir, "bench_remote")
    keys = (host.public, host.secret), (worker.public, worker.secret)
    block, rounds = count // 3, 3
    floor_direct: list[float] = []
    floor_bare: list[float] = []
    floor_large: list[float] = []
    config = pyisolate.ExtensionManagerConfig(
        venv_root_path=work / "venvs", listen="tcp://127.0.0.1:*",
        curve=pyisolate.CurveConfig(server_secret_key=host_secret, workers={"bench_remote": worker_public}))
    samples_small: list[float] = []
    samples_large: list[float] = []
    async with pyisolate.ExtensionManager(pyisolate.ExtensionBase, config) as manager:
        ext = manager.load_extension(pyisolate.ExtensionConfig(name="bench_remote", module_path=str(REMOTE_EXT),
                                                               remote=True))
        assert manager.listen_endpoint is not None
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pyisolate", "worker", "--connect", manager.listen_endpoint, "--server-key",
            host.public, "--key", str(worker_secret), "--venv-root", str(work / "venvs"), str(REMOTE_EXT),
            stdin=subprocess.DEVNULL)
        try:
            await ext
            tensor = torch.ones(TENSOR_BYTES // 4)
            # Floors and pyisolate in alternating rounds: load from elsewhere on the machine hits both.
            direct, bare = CurveFloor("asyncio", *keys), CurveFloor("bare", *keys)
            blob = await asyncio.to_thread(BlobFloor, *keys)
            try:
                await direct.start()
                await bare.start()
                for _ in range(rounds):
                    floor_direct += await common.time_calls(direct.small, block, 100)
                    floor_bare += await common.time_calls(bare.small, block, 100)
                    samples_small += await common.time_calls(lambda: ext.aecho(1), block, 100)
                await asyncio.to_thread(blob.round_trip)
                await ext.aecho(tensor)
                for _ in range(reps):
                    floor_large.append(await asyncio.to_thread(blob.round_trip))
                    samples_large += await common.time_calls(lambda: ext.aecho(tensor), 1, 0)
            finally:
                await direct.close()
                await bare.close()
                await asyncio.to_thread(blob.close)
            await ext.stop()
        finally:
            if proc.returncode is None:
                proc.terminate()
            await proc.wait()
    results = []
    for name, label, samples, baseline, size in (
        ("remote.floor.direct", "direct floor (zmq.asyncio ROUTER, msgpack echo) on tcp + CURVE", floor_direct, None,
         None),
        ("remote.floor.bare", "bare floor (add_reader ROUTER, msgpack echo) on tcp + CURVE", floor_bare, None, None),
        ("remote.call.small", "remote worker (tcp + CURVE), small call", samples_small, "remote.floor.direct", None),
        (f"remote.floor.tensor.{TENSOR_BYTES}", "bare pyzmq tcp + CURVE round trip, 64 MiB", floor_large, None,
         TENSOR_BYTES),
        (f"remote.tensor.{TENSOR_BYTES}", "remote worker (tcp + CURVE), 64 MiB tensor there and back", samples_large,
         f"remote.floor.tensor.{TENSOR_BYTES}", TENSOR_BYTES),
    ):
        median, p99 = common.median_p99(samples)
        results.append(common.Result(
            name, "remote (tcp + CURVE)", label, median, "us", p99=p99, baseline=baseline,
            target=1.25 if baseline else None, target_note="<= 1.25x bare pyzmq tcp + CURVE" if baseline else "",
            samples=len(samples), size=size, series=None))
    bare = common.median_p99(floor_bare)[0]
    results[2].extra["x_bare_floor"] = results[2].value / bare if bare else None
    return results


if __name__ == "__main__":
    common.section_main(measure, __doc__, "pyisolate-bench-remote-")
