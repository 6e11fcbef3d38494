"""A node-pack workflow as a ComfyUI-like host runs it, next to the same operations in-process.

Eight node packs (``share_torch=True``), one plain node method each; the workflow passes a
12 MiB image (1x1024x1024x3 float32) through the eight nodes in turn, every node returning a
fresh tensor, called from a synchronous host thread (``pyisolate.sync``), as ComfyUI's
executor calls nodes. The in-process baseline runs the same eight operations in the same
thread, in the same run, in alternating blocks.

The *process floor* runs the same eight nodes in eight bare child processes (no pyisolate):
each child maps an input and an output memfd, waits on a pipe, runs the node on its input and
copies the fresh result into its output; the host copies each node's output into the next
child's input. Those are the two copies a hop costs wherever packs must not see each other's
memory (see ``shm.copies_forward``), so the floor is what this machine allows for an
isolated workflow, and ``workflow.isolated.over_floor`` is pyisolate's own share.

Memory: the USS of the host and of the eight workers after 20 workflows and after all of
them (300; 60 in quick mode): it must stay flat (glibc must not keep the freed images).

    python benchmarks/workflow.py [--quick]
"""

from __future__ import annotations

import asyncio
import mmap
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

import pyisolate  # noqa: E402

NODE_PACK = common.ROOT / "benchmarks" / "node_pack"
PACKS = 8
#: ComfyUI's IMAGE: [batch, height, width, channels] float32.
SHAPE = (1, 1024, 1024, 3)
#: Workflows after which memory is first weighed.
SETTLED = 20


#: A bare child of the process floor: argv = node pack dir, in fd, out fd, read fd, write fd.
FLOOR_CHILD = r"""
import mmap, os, struct, sys
import torch
sys.path.insert(0, sys.argv[1])
import nodes
fd_in, fd_out, rfd, wfd = map(int, sys.argv[2:6])
SHAPE = (1, 1024, 1024, 3)
def view(fd):
    return torch.frombuffer(mmap.mmap(fd, os.fstat(fd).st_size), dtype=torch.float32).view(SHAPE)
src, dst = view(fd_in), view(fd_out)
os.write(wfd, b"r")
while len(msg := os.read(rfd, 8)) == 8:
    dst.copy_(nodes.node(src, struct.unpack("d", msg)[0]))
    os.write(wfd, b"d")
"""


class ProcessFloor:
    """``PACKS`` bare child processes running the node between memfds (see the module's doc)."""

    def __init__(self) -> None:
        self._children: list[tuple[subprocess.Popen[bytes], int, int]] = []
        self.calls: list[Any] = []

    def start(self) -> None:
        import torch

        nbytes = 4 * SHAPE[0] * SHAPE[1] * SHAPE[2] * SHAPE[3]
        for i in range(PACKS):
            fds = [os.memfd_create(f"workflow-floor-{i}-{end}") for end in ("in", "out")]
            for fd in fds:
                os.ftruncate(fd, nbytes)
            (to_child, w), (r, from_child) = os.pipe(), os.pipe()
            try:
                views = [torch.frombuffer(mmap.mmap(fd, nbytes), dtype=torch.float32).view(SHAPE) for fd in fds]
                proc = subprocess.Popen([sys.executable, "-c", FLOOR_CHILD, str(NODE_PACK), *map(str, fds),
                                         str(to_child), str(from_child)], pass_fds=(*fds, to_child, from_child))
            except BaseException:
                os.close(w)
                os.close(r)
                raise
            finally:  # the child holds its own copies (and the views their mappings)
                for fd in (*fds, to_child, from_child):
                    os.close(fd)
            self._children.append((proc, w, r))
            self.calls.append(self._caller(views[0], views[1], w, r))
        for proc, _, r in self._children:
            if os.read(r, 1) != b"r":
                raise RuntimeError(f"a process-floor child did not start (exit code {proc.wait()})")

    @staticmethod
    def _caller(src: Any, dst: Any, w: int, r: int) -> Any:
        def call(image: Any, scale: float) -> Any:
            src.copy_(image)
            os.write(w, struct.pack("d", scale))
            if os.read(r, 1) != b"d":
                raise RuntimeError("a process-floor child went away")
            return dst

        return call

    def close(self) -> None:
        for proc, w, r in self._children:
            os.close(w)  # the child's read ends: it exits
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            os.close(r)
        self._children.clear()
        self.calls.clear()


def _nodes() -> Any:
    sys.path.insert(0, str(NODE_PACK))
    try:
        import nodes  # the pack's own node function, for the in-process baseline
    finally:
        sys.path.remove(str(NODE_PACK))
    return nodes


def _run_workflow(calls: list[Any], image: Any) -> float:
    """Pass ``image`` through ``calls`` in turn; milliseconds."""
    start = time.perf_counter()
    for i, call in enumerate(calls):
        image = call(image, 1.0 + i / 1000)
    assert image.shape == SHAPE
    return (time.perf_counter() - start) * 1e3


def _blocks(ways: dict[str, list[Any]], weigh: Any, total: int, block: int) -> dict[str, Any]:
    """Alternating blocks of workflows of each way, in a plain thread; memory weighed at SETTLED and at the end."""
    import torch

    samples: dict[str, list[float]] = {name: [] for name in ways}
    memory: dict[str, Any] = {}
    for calls in ways.values():  # warm-up
        _run_workflow(calls, torch.rand(SHAPE))
    done = 0
    while done < total:
        n = min(block, total - done)
        for name, calls in ways.items():
            for _ in range(n):
                samples[name].append(_run_workflow(calls, torch.rand(SHAPE)))
        done += n
        if done == SETTLED:
            memory["settled"] = weigh()
    memory["end"] = weigh()
    return {"samples": samples, "memory": memory}


async def measure(work: Path, quick: bool) -> list[common.Result]:
    total = 60 if quick else 300
    nodes = _nodes()
    config = pyisolate.ExtensionManagerConfig(venv_root_path=work / "venvs")
    async with pyisolate.ExtensionManager(pyisolate.ExtensionBase, config) as manager:
        packs = await asyncio.gather(*(manager.load_extension(pyisolate.ExtensionConfig(
            name=f"pack{i}", module_path=NODE_PACK, share_torch=True)) for i in range(PACKS)))
        blocking = [pyisolate.sync(pack) for pack in packs]

        def weigh() -> dict[str, float]:
            workers = [common.memory_from(b.smaps_rollup())["uss"] for b in blocking]
            return {"host": common.memory_of(os.getpid())["uss"], "workers": sum(workers), "worst_worker": max(workers)}

        floor = ProcessFloor()
        try:
            await asyncio.to_thread(floor.start)
            ways = {"in_process": [nodes.node] * PACKS, "isolated": [b.node for b in blocking],
                    "process_floor": floor.calls}
            found = await asyncio.to_thread(_blocks, ways, weigh, total, SETTLED // 2)
        finally:
            await asyncio.to_thread(floor.close)
    samples, memory = found["samples"], found["memory"]
    results = []
    for name, label, target, note in (
        ("workflow.in_process", f"{PACKS} nodes in-process, 12 MiB image", None, ""),
        ("workflow.process_floor", f"{PACKS} nodes in {PACKS} bare processes, 2 copies a hop (no pyisolate)", None, ""),
        ("workflow.isolated", f"{PACKS} nodes in {PACKS} share_torch packs, sync thread", 2.0,
         "<= 2x the same nodes in-process"),
    ):
        median, p99 = common.median_p99(samples[name.split(".")[1]])
        results.append(common.Result(name, "workflow", label, median, "ms", p99=p99,
                                     baseline=None if target is None and "floor" not in name else "workflow.in_process",
                                     target=target, target_note=note, samples=len(samples[name.split(".")[1]]),
                                     ci_check=False))
    results.append(common.Result(
        "workflow.isolated.over_floor", "workflow", "isolated workflow over the process floor",
        statistics.median(samples["isolated"]) / statistics.median(samples["process_floor"]), "x",
        target=1.5, target_note="pyisolate adds at most 50% to what two copies a hop cost bare processes"))
    for who, label in (("host", "host"), ("workers", f"{PACKS} workers together")):
        settled, end = memory["settled"][who], memory["end"][who]
        results.append(common.Result(f"workflow.uss.{who}.{SETTLED}", "workflow",
                                     f"USS of the {label} after {SETTLED} workflows", settled, "MB"))
        results.append(common.Result(f"workflow.uss.{who}", "workflow",
                                     f"USS of the {label} after {total} workflows", end, "MB",
                                     baseline=f"workflow.uss.{who}.{SETTLED}", target=1.1,
                                     target_note=f"<= +10% of the USS after {SETTLED} workflows"))
    return results


if __name__ == "__main__":
    common.section_main(measure, __doc__, "pyisolate-workflow-")
