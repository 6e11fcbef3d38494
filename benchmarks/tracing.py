"""What tracing costs a small call: host -> extension with ``tracing=False`` and ``tracing=True``.

Two managers side by side in one run, one extension each, measured in alternating rounds. With
tracing on, the host has OpenTelemetry's SDK provider with no exporter: the figure is the cost
of making the two spans, carrying the context and shipping the worker's span to the host, not
of any exporter. With tracing off the call header and the work are those of a host without the
feature (``tests/unit/test_trace_context.py`` checks the header byte for byte).

    python benchmarks/tracing.py [--quick]
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_api  # noqa: E402
import common  # noqa: E402

import pyisolate  # noqa: E402


def _provider() -> None:
    """An SDK TracerProvider for the process, without exporter, unless one is set already."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider())


async def measure(work: Path, quick: bool) -> list[common.Result]:
    if importlib.util.find_spec("opentelemetry.sdk") is None:
        print("tracing: skipped, OpenTelemetry is not installed (pip install 'pyisolate[otel]')", file=sys.stderr)
        return []
    _provider()
    count, rounds = (900, 3) if quick else (6000, 6)
    block = count // rounds
    samples: dict[str, list[float]] = {}
    managers = {
        "trace.call.off": pyisolate.ExtensionManager(pyisolate.ExtensionBase, pyisolate.ExtensionManagerConfig(
            venv_root_path=work / "venvs")),
        "trace.call.on": pyisolate.ExtensionManager(pyisolate.ExtensionBase, pyisolate.ExtensionManagerConfig(
            venv_root_path=work / "venvs", tracing=True)),
    }
    try:
        exts = {}
        for name, manager in managers.items():
            exts[name] = await manager.load_extension(pyisolate.ExtensionConfig(
                name="bench-trace", module_path=common.BENCH_EXT, apis=[bench_api.BenchService]))
        for _ in range(rounds):
            for name, ext in exts.items():
                samples.setdefault(name, []).extend(
                    await common.time_calls(lambda ext=ext: ext.aecho(1), block, 20))
    finally:
        for manager in managers.values():
            await manager.stop_all()
    meta = {
        "trace.call.off": ("host -> extension, async method, tracing off", None, None, ""),
        "trace.call.on": ("host -> extension, async method, tracing on (2 spans, no exporter)", "trace.call.off",
                          2.5, "<= 2.5x tracing off (informational: not checked, the SDK's spans cost what they cost)"),
    }
    results = []
    for name, (label, baseline, target, note) in meta.items():
        median, p99 = common.median_p99(samples[name])
        results.append(common.Result(name, "tracing", label, median, "us", p99=p99, baseline=baseline,
                                     target=target, target_note=note, samples=len(samples[name]),
                                     ci_check=baseline is None))
    return results


if __name__ == "__main__":
    common.section_main(measure, __doc__, "pyisolate-bench-tracing-")
