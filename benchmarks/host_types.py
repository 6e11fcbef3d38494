"""What the application's own types cost: a registered dataclass beside a plain dict of the same
fields, and a method call through a handle beside a call to a host singleton.

Measured in rounds, alternating, in one run: host -> extension echo of a ``Record`` dataclass
and of the dict of its fields; extension -> host ``echo`` on a handle to a host object, and on
the host's ``BenchService`` singleton (the same async method body).

    python benchmarks/host_types.py [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_api  # noqa: E402
import bench_types  # noqa: E402
import common  # noqa: E402

import pyisolate  # noqa: E402


async def measure(work: Path, quick: bool) -> list[common.Result]:
    count, rounds = (600, 3) if quick else (3000, 6)
    block = count // rounds
    config = pyisolate.ExtensionManagerConfig(venv_root_path=work / "venvs", types="bench_types:register_types")
    samples: dict[str, list[float]] = {}
    async with pyisolate.ExtensionManager(pyisolate.ExtensionBase, config) as manager:
        ext = await manager.load_extension(pyisolate.ExtensionConfig(
            name="bench-types", module_path=common.BENCH_EXT, apis=[bench_api.BenchService]))
        record, fields, echo = bench_types.Record(**bench_types.FIELDS), dict(bench_types.FIELDS), bench_types.Echo()
        assert await ext.aecho(record) == record
        contenders = {
            "types.value.dict": lambda: common.time_calls(lambda: ext.aecho(fields), block, 20),
            "types.value.dataclass": lambda: common.time_calls(lambda: ext.aecho(record), block, 20),
            "types.call.singleton": lambda: ext.singleton_loop(block, 20),
            "types.call.handle": lambda: ext.handle_loop(pyisolate.handle(echo), block, 20),
        }
        for _ in range(rounds):
            for name, run in contenders.items():
                samples.setdefault(name, []).extend(await run())
    meta = {
        "types.value.dict": ("host -> extension, a dict of 6 fields", None, None, ""),
        "types.value.dataclass": ("host -> extension, a registered dataclass of the same 6 fields",
                                  "types.value.dict", 1.2, "<= 1.2x the plain dict"),
        "types.call.singleton": ("extension -> host singleton method", None, None, ""),
        "types.call.handle": ("extension -> host object's method, through a handle", "types.call.singleton", 1.1,
                              "<= 1.1x the singleton call"),
    }
    results = []
    for name, (label, baseline, target, note) in meta.items():
        median, p99 = common.median_p99(samples[name])
        results.append(common.Result(name, "host types", label, median, "us", p99=p99, baseline=baseline,
                                     target=target, target_note=note, samples=len(samples[name])))
    return results


if __name__ == "__main__":
    common.section_main(measure, __doc__, "pyisolate-bench-types-")
