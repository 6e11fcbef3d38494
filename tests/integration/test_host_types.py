"""The application's own types by value, and its objects by reference (handles), through real workers.

The application is tests/app_types/typedapp (its types and ``isolation:register_types``); the
extension tests/extensions/typed imports it from the host path the manager grants it.
"""

from __future__ import annotations

import asyncio
import gc
import sys
from pathlib import Path

import pytest

from pyisolate import (
    ConfigError,
    EncodeError,
    ExtensionBase,
    ExtensionConfig,
    ExtensionLoadError,
    ExtensionManager,
    ExtensionManagerConfig,
)
from pyisolate._wire import DecodeError

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app_types"
EXT = ROOT / "extensions" / "typed"

sys.path.insert(0, str(APP))  # the host application's own package, as the host imports it
from typedapp.results import Device, FolderType, Level, Model, Point, SavedResult, Unregistered  # noqa: E402


@pytest.fixture
async def typed(venv_root: Path, tmp_path: Path):
    config = ExtensionManagerConfig(venv_root_path=venv_root, types="typedapp.isolation:register_types",
                                    sandbox={"writable_paths": [tmp_path]})
    async with ExtensionManager(ExtensionBase, config) as manager:
        yield manager


async def load(manager: ExtensionManager, name: str = "typed"):
    async with asyncio.timeout(120):
        return await manager.load_extension(ExtensionConfig(name=name, module_path=EXT))


async def test_registered_values_travel_as_themselves_both_ways(typed):
    ext = await load(typed)
    values = [SavedResult("x.png", "out", FolderType.output, b"\0" * 200_000), FolderType.temp, Level.low,
              Point(3, 4), Device("cpu:0"), {"in": [Point(0, 1)], 5: (Level.high, {Device("cuda:0")})}]
    back = await ext.echo(values)
    assert back == values
    assert [type(v) for v in back] == [type(v) for v in values]
    assert type(back[5]["in"][0]) is Point and type(back[5][5][0]) is Level  # nested, keys kept too
    # Inside a registered value, binaries keep their type (a bytearray stays one) as anywhere else.
    mutable = await ext.echo(SavedResult("b.png", "", FolderType.temp, bytearray(b"ab")))
    assert type(mutable.data) is bytearray and mutable.data == bytearray(b"ab")
    # In the worker they are the application's classes, imported there from the host path.
    assert await ext.kinds(values[:5]) == ["typedapp.results.SavedResult", "typedapp.results.FolderType",
                                           "typedapp.results.Level", "typedapp.results.Point",
                                           "typedapp.results.Device"]
    made = await ext.make()
    assert made[0] == SavedResult("a.png", "sub", FolderType.temp, b"x" * 100_000)
    assert made[1:4] == [Level.high, Point(1, 2), Device("cuda:1")]
    assert type(made[4]["nested"][0]) is FolderType


async def test_an_unregistered_type_fails_with_how_to_register_it(typed):
    ext = await load(typed)
    with pytest.raises(EncodeError, match=r"argument 1: .*register its class in the host's TypeRegistry"):
        await ext.echo(Unregistered())
    with pytest.raises(EncodeError, match="register its class"):  # sent by the worker: its error comes back
        await ext.unregistered()
    assert await ext.echo(1) == 1  # the extension is fine


async def test_a_handle_calls_the_object_where_it_lives(typed):
    ext = await load(typed)
    model = Model("sd15")
    described, predicted, text = await ext.use_model(model)
    assert (described, predicted) == ("model sd15", 42)
    assert "Model object" in text and "'host'" in text
    assert await ext.use_model_plain(model) == ["model sd15", 42]  # plain code: calls block and return
    assert model.calls == 4
    assert all(name.startswith("pyisolate-host") for name in model.threads)  # plain methods: the host's pool
    # Attributes, properties and private methods stay where the object lives.
    for name in ("name", "size", "secret", "_private", "calls"):
        assert "reaches only its public methods" in await ext.attribute(model, name)
    assert model.size_reads == 0  # a property is never evaluated to describe or serve a handle
    # Sent back to its owner, a handle is the object itself.
    assert await ext.echo(model) is model
    await ext.keep(model)
    assert await ext.kept_is_same() is model


async def test_a_worker_reaches_nothing_of_a_handle_but_its_public_methods(typed):
    ext = await load(typed)
    model = Model("guarded")
    await ext.keep(model)
    ref_id = typed.endpoint.exports._ids[(id(model), True)]
    assert await ext.raw_call(ref_id, "describe") == "model guarded"
    for name in ("size", "_private", "__init__", "secret", "name", "", "__class__"):
        with pytest.raises(AttributeError):
            await ext.raw_call(ref_id, name)
    assert model.size_reads == 0 and model.calls == 1
    with pytest.raises(LookupError, match="not held"):
        await ext.raw_call(ref_id + 1, "describe")  # never given to it


async def test_an_extension_in_the_host_gets_the_object_a_handle_stands_for(typed):
    import pyisolate

    local = await typed.load_extension(ExtensionConfig(name="typed-local", module_path=EXT, isolated=False))
    model = Model("local")
    assert await local.echo(pyisolate.handle(model)) is model
    assert await local.echo(value=pyisolate.handle(model)) is model  # keyword arguments too


async def test_a_handle_passed_to_a_third_actor_is_forwarded_by_the_sender(typed):
    a, b = await load(typed, "typed-a"), await load(typed, "typed-b")
    model = Model("forwarded")
    described, predicted, text = await a.pass_on(model, "typed-b")
    assert (described, predicted) == ("model forwarded", 42)
    assert "'typed-a'" in text  # b's handle is a's: its calls went through a
    assert model.calls == 2
    await a.drop()
    await b.drop()
    await a.echo(None)  # a's proxy of ours, released once b released a's forward
    assert await a.counts() == {"exports": 0, "proxies": 0}
    assert len(typed.endpoint.exports) == 0


async def test_10000_handles_created_and_dropped_leave_no_export_on_either_side(typed):
    ext = await load(typed)
    models = [Model(f"m{i}") for i in range(10_000)]
    assert await ext.take_many([m for m in models]) == 10_000
    assert len(typed.endpoint.exports) == 10_000
    await ext.drop()  # its RELEASEs travel ahead of this answer
    assert len(typed.endpoint.exports) == 0
    # The other way: 10,000 objects of the worker, handed to the host by handle.
    own = await ext.make_own(10_000)
    assert len(own) == 10_000 and await ext.counts() == {"exports": 10_000, "proxies": 0}
    assert [await h.describe() for h in own[:3]] == ["model own0", "model own1", "model own2"]
    await ext.forget_own()  # the worker forgets its list; the exports keep the objects alive
    assert await own[9_999].describe() == "model own9999"
    del own
    gc.collect()
    await asyncio.sleep(0)  # one loop turn: the finalizers' RELEASEs go out, ahead of the next call
    assert await ext.counts() == {"exports": 0, "proxies": 0}
    assert typed.endpoint.values.live_proxies() == 0


async def test_types_module_the_worker_cannot_import_fails_the_load_clearly(venv_root: Path, tmp_path: Path):
    config = ExtensionManagerConfig(venv_root_path=venv_root, types="typedapp.isolation:needs_numpy")
    async with ExtensionManager(ExtensionBase, config) as manager:
        with pytest.raises(ExtensionLoadError, match=r"type registry 'typedapp.isolation:needs_numpy' "
                                                     r"\(ExtensionManagerConfig.types\).*No module named 'numpy'"):
            await load(manager)


def test_types_config_is_checked_where_it_is_given(venv_root: Path):
    with pytest.raises(ConfigError, match="must be 'module:function'"):
        ExtensionManagerConfig(venv_root_path=venv_root, types="typedapp.isolation.register_types")

    def nested(registry):
        pass

    with pytest.raises(ConfigError, match="module-level function"):
        ExtensionManagerConfig(venv_root_path=venv_root, types=nested)
    with pytest.raises(ConfigError, match="cannot be imported in the host"):
        ExtensionManager(ExtensionBase, ExtensionManagerConfig(venv_root_path=venv_root, types="nosuchmod:f"))
    with pytest.raises(ConfigError, match="host's site-packages"):  # msgpack lives there
        ExtensionManager(ExtensionBase, ExtensionManagerConfig(venv_root_path=venv_root, types="msgpack:packb"))
    from typedapp import isolation

    config = ExtensionManagerConfig(venv_root_path=venv_root, types=isolation.register_types)
    assert config.types == "typedapp.isolation:register_types"


async def test_the_types_folder_is_readable_never_writable_in_a_confined_worker(typed):
    from pyisolate._host import sandbox_offered

    if sandbox_offered().get("landlock_abi", 0) < 1:
        pytest.skip("Landlock is not available on this machine")
    ext = await load(typed)
    with pytest.raises(PermissionError):
        await ext.write_into(str(APP / "typedapp" / "planted.py"))
    assert not (APP / "typedapp" / "planted.py").exists()


async def test_a_hostile_registered_value_is_refused_not_constructed(typed):
    from pyisolate._wire import decode, encode
    from pyisolate._wire.base import EXT_REGISTERED
    import msgpack

    class Hooks:  # what an endpoint gives the codec; here only the registry matters
        types = typed.app_types.registry

        def export(self, obj):
            return None

    def forged(name, wire):
        return msgpack.packb(msgpack.ExtType(EXT_REGISTERED, msgpack.packb([name, wire])))

    with pytest.raises(DecodeError, match="no such type"):
        decode(forged("os.system", "echo hi"), (), Hooks())
    with pytest.raises(DecodeError, match=r"do not match: missing \['type'\], unexpected 'evil'"):
        decode(forged("app.SavedResult", {"filename": "a", "subfolder": "b", "data": b"", "evil": 1}), (), Hooks())
    with pytest.raises(DecodeError, match="filename must be a str"):  # the class's own checks run
        decode(forged("app.SavedResult", {"filename": 5, "subfolder": "b", "type": "temp", "data": b""}),
               (), Hooks())
    with pytest.raises(DecodeError, match="not a value of app.FolderType"):
        decode(forged("app.FolderType", "nope"), (), Hooks())
    with pytest.raises(DecodeError, match="registered by reference"):
        decode(forged("typedapp.results.Model", {}), (), Hooks())
    body, _ = encode(Point(1, 2), Hooks())
    assert decode(body, (), Hooks()) == Point(1, 2)
    with pytest.raises(DecodeError, match="no such type"):  # a process without the registry refuses it
        decode(body, (), type("NoTypes", (), {"types": None, "export": lambda self, o: None})())


def test_torch_device_and_dtype_register_as_the_issue_writes_them():
    torch = pytest.importorskip("torch")
    from pyisolate import TypeRegistry
    from pyisolate._wire import decode, encode

    dtypes = {str(t): t for t in (torch.float16, torch.float32, torch.bfloat16, torch.int64, torch.bool)}
    registry = TypeRegistry()
    registry.register(torch.device, name="torch.device", encode=str, decode=torch.device)
    registry.register(torch.dtype, name="torch.dtype", encode=str, decode=dtypes.__getitem__)  # an allowlist

    class Hooks:
        types = registry

        def export(self, obj):
            return None

    value = {"device": torch.device("cpu"), "dtypes": [torch.float16, torch.bool]}
    body, buffers = encode(value, Hooks())
    assert decode(body, buffers, Hooks()) == value
    with pytest.raises(ConfigError, match="already travels"):
        registry.register(torch.Tensor, encode=str, decode=str)
    import msgpack

    from pyisolate._wire.base import EXT_REGISTERED

    forged = msgpack.packb(msgpack.ExtType(EXT_REGISTERED, msgpack.packb(["torch.dtype", "os.system"])))
    with pytest.raises(DecodeError, match="cannot rebuild"):
        decode(forged, (), Hooks())


def test_registering_says_what_is_wrong_and_how_to_fix_it():
    import dataclasses

    from pyisolate import TypeRegistry

    registry = TypeRegistry()
    registry.register(Point)
    with pytest.raises(ConfigError, match="already registered"):
        registry.register(Point, name="other")
    with pytest.raises(ConfigError, match="the name 'typedapp.results.Point' is taken"):
        registry.register(Level, name="typedapp.results.Point")
    with pytest.raises(ConfigError, match="give encode= .* or by_reference=True"):
        registry.register(Unregistered)
    with pytest.raises(ConfigError, match="both encode= and decode="):
        registry.register(Unregistered, encode=str)
    with pytest.raises(ConfigError, match="drop encode= and decode="):
        registry.register(Unregistered, by_reference=True, encode=str, decode=str)
    with pytest.raises(ConfigError, match="already travels"):
        registry.register(dict)
    with pytest.raises(ConfigError, match="already travels"):
        registry.register(ValueError)

    @dataclasses.dataclass
    class Computed:
        x: int
        y: int = dataclasses.field(init=False, default=0)

    with pytest.raises(ConfigError, match="init=False"):
        registry.register(Computed)
    assert registry.register(Model, by_reference=True) is Model and Model in registry and len(registry) == 2
