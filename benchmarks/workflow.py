"""A node-pack workflow as a ComfyUI-like host runs it, next to the same operations in-process.

Eight node packs (``share_torch=True``), one plain node method each; the workflow passes a
12 MiB image (1x1024x1024x3 float32) through the eight nodes in turn, every node returning a
fresh tensor, called from a synchronous host thread (``pyisolate.sync``), as ComfyUI's
executor calls nodes. The in-process baseline runs the same eight operations in the same
thread, in the same run, in alternating blocks.

Memory: the USS of the host and of the eight workers after 20 workflows and after all of
them (300; 60 in quick mode): it must stay flat (glibc must not keep the freed images).

    python benchmarks/workflow.py [--quick]
"""

from __future__ import annotations

import asyncio
import os
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


def _blocks(in_process: list[Any], isolated: list[Any], weigh: Any, total: int, block: int) -> dict[str, Any]:
    """Alternating blocks of workflows, in a plain thread; memory weighed at SETTLED and at the end."""
    import torch

    samples: dict[str, list[float]] = {"in_process": [], "isolated": []}
    memory: dict[str, Any] = {}
    _run_workflow(in_process, torch.rand(SHAPE))  # warm-up: each worker imports torch on its first tensor
    _run_workflow(isolated, torch.rand(SHAPE))
    done = 0
    while done < total:
        n = min(block, total - done)
        for _ in range(n):
            samples["in_process"].append(_run_workflow(in_process, torch.rand(SHAPE)))
        for _ in range(n):
            samples["isolated"].append(_run_workflow(isolated, torch.rand(SHAPE)))
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

        found = await asyncio.to_thread(
            _blocks, [nodes.node] * PACKS, [b.node for b in blocking], weigh, total, SETTLED // 2)
    samples, memory = found["samples"], found["memory"]
    results = []
    for name, label, baseline, target, note in (
        ("workflow.in_process", f"{PACKS} nodes in-process, 12 MiB image", None, None, ""),
        ("workflow.isolated", f"{PACKS} nodes in {PACKS} share_torch packs, sync thread", "workflow.in_process",
         2.0, "<= 2x the same nodes in-process"),
    ):
        median, p99 = common.median_p99(samples[name.split(".")[1]])
        results.append(common.Result(name, "workflow", label, median, "ms", p99=p99, baseline=baseline,
                                     target=target, target_note=note, samples=len(samples[name.split(".")[1]]),
                                     ci_check=False))
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
