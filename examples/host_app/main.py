"""A host shaped like ComfyUI's use of pyisolate: two node packs with conflicting numpy, each in
its own venv and process, both working on a model that stays in the host.

Run from the repository root:  .venv/bin/python examples/host_app/main.py
"""

import asyncio
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import pyisolate

HERE = Path(__file__).parent
APP = HERE / "app"  # the host application's own source root, which holds the nodeapp package
sys.path.insert(0, str(APP))  # the host imports nodeapp from there (ComfyUI: from its own folder)

from nodeapp.model import Device, DType, Model  # noqa: E402

PACKS = {"pack_old": "numpy<2", "pack_new": "numpy>=2"}  # each node pack and the numpy it needs


def states(extensions: Mapping[str, pyisolate.Extension]) -> dict[str, str]:
    return {name: ext.state for name, ext in extensions.items()}


async def main() -> None:
    with tempfile.TemporaryDirectory() as outputs:
        sandbox = {"network": False, "writable_paths": [outputs], "readonly_paths": []}
        manager = pyisolate.ExtensionManager(pyisolate.ExtensionBase, {  # configs as dicts, as ComfyUI writes them
            "venv_root_path": HERE / "venvs",
            "types": "nodeapp.isolation:register_types",  # the host and every worker register the same types
            "host_paths": [APP],  # workers may import nodeapp (read-only), and nothing else of the host's
            "sandbox": sandbox,  # the ceiling: an extension's own sandbox may only narrow it
        })
        async with manager:
            packs = {}
            for name, numpy in PACKS.items():
                packs[name] = manager.load_extension({  # returns at once; the two venvs build in parallel
                    "name": name,
                    "module_path": HERE / "custom_nodes" / name,
                    "isolated": True,
                    "dependencies": [numpy],
                    "share_torch": False,
                    "sandbox_mode": pyisolate.SandboxMode.PREFERRED,  # or "preferred": confine as far as this
                    "sandbox": sandbox,                               # machine can ("required": refuse if not)
                })
            print("loading:", states(manager.extensions))  # manager.extensions: name -> handle
            await asyncio.gather(*packs.values())  # awaiting a handle waits until it is ready
            print("loaded: ", states(manager.extensions))

            model = Model("tiny-unet", scale=2.0, device=Device("cpu"), dtype=DType.float32)
            values = [1.0, 4.0, 2.0, 8.0]
            print(f"\n{'pack':<9} {'numpy':<7} {'model calls':<12} returned")
            for name, node in (("pack_old", packs["pack_old"].sharpen), ("pack_new", packs["pack_new"].blur)):
                before = model.calls
                # The model is registered by reference: the node gets a handle, and its calls run here.
                # The SavedResult comes back by value, as the host's own dataclass.
                result, numpy_version = await node(model, values, outputs)
                print(f"{name:<9} {numpy_version:<7} {model.calls - before:<12} {result!r}")
            print("\nsaved in outputs/:", sorted(path.name for path in Path(outputs).iterdir()))
        print("stopped:", states(packs), "- still listed:", dict(manager.extensions))


if __name__ == "__main__":
    asyncio.run(main())
