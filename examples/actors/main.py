"""Actors by name: extensions call each other and the host's singletons by name.

Run from the repository root:  .venv/bin/python examples/actors/main.py
"""

import asyncio
from pathlib import Path

from services import AuditLog

from pyisolate import ExtensionBase, ExtensionConfig, ExtensionManager, ExtensionManagerConfig, UnroutableError

HERE = Path(__file__).parent


async def main() -> None:
    config = ExtensionManagerConfig(venv_root_path=HERE / "venvs")
    async with ExtensionManager(ExtensionBase, config) as manager:
        await asyncio.gather(
            manager.load_extension(ExtensionConfig(name="pricing", module_path=HERE / "extensions" / "pricing")),
            manager.load_extension(
                ExtensionConfig(name="checkout", module_path=HERE / "extensions" / "checkout", apis=[AuditLog])),
        )

        # In the host: handles by name (an extension) or by class (a singleton).
        checkout = manager.get_actor("checkout")
        print("pricing.price('bread')  ->", await manager.get_actor("pricing").price("bread"))
        print("checkout.total(...)     ->", await checkout.total(["apple", "bread", "cheese"]))
        print("AuditLog entries        ->", AuditLog().entries)
        print("AuditLog by class       ->", await manager.get_actor(AuditLog).record("host", "checked the log"))

        # Unknown names fail with UnroutableError naming them, in an extension and in the host.
        print("from checkout           ->", await checkout.call_unknown())
        try:
            manager.get_actor("inventory")
        except UnroutableError as exc:
            print("from the host           -> UnroutableError:", exc)


if __name__ == "__main__":
    asyncio.run(main())
