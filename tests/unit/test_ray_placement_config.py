"""RayPlacement: what it accepts, what it refuses (naming the field and the fix), without Ray."""

from __future__ import annotations

import importlib.util
import sys

import pytest

import pyisolate
from pyisolate import ConfigError, RayPlacement

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed (pip install 'pyisolate[ray]')")


@needs_ray
def test_gpu_cpu_and_memory_go_to_rays_keywords_the_rest_to_resources() -> None:
    placement = RayPlacement(resources={"GPU": 1, "memory": 2**30, "big_disk": 0.5})
    assert placement.actor_options() == {"num_cpus": 1.0, "num_gpus": 1.0, "memory": float(2**30),
                                         "resources": {"big_disk": 0.5}}
    assert RayPlacement(num_cpus=0).actor_options()["num_cpus"] == 0
    assert RayPlacement(resources={"CPU": 4}).actor_options()["num_cpus"] == 4
    assert placement.describe() == "CPU=1, GPU=1, big_disk=0.5, memory=1.07374e+09"
    assert hash(placement) == hash(RayPlacement(resources={"big_disk": 0.5, "GPU": 1, "memory": 2**30}))


@needs_ray
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"resources": ["GPU"]}, r"RayPlacement.resources must map resource names to quantities"),
        ({"resources": {"": 1}}, r"a resource name must be a non-empty string"),
        ({"resources": {"GPU": 0}}, r"RayPlacement.resources\['GPU'\] must be a positive number"),
        ({"resources": {"GPU": True}}, r"must be a positive number"),
        ({"resources": {"GPU": 1.5}}, r"fractions of one unit only .* use 2"),
        ({"resources": {"CPU": 1}, "num_cpus": 2}, r"both num_cpus=2 and resources\['CPU'\]"),
        ({"num_cpus": -1}, r"RayPlacement.num_cpus must be a number of CPUs >= 0"),
        ({"address": "local"}, r"would start a new Ray cluster .*ray start --head"),
        ({"address": ""}, r"RayPlacement.address must be None, 'auto'"),
        ({"connect": "127.0.0.1:5555"}, r"RayPlacement.connect must be the host's listener .* 'tcp://HOST:PORT'"),
        ({"python": "python3"}, r"RayPlacement.python must be an absolute path on the nodes"),
        ({"venv_root": "venvs"}, r"RayPlacement.venv_root must be an absolute path on the nodes"),
        ({"env": {"A=B": "x"}}, r"RayPlacement.env must map variable names to strings"),
        ({"env": {"A": 1}}, r"RayPlacement.env must map variable names to strings"),
        ({"start_timeout": 0}, r"RayPlacement.start_timeout must be a positive number of seconds"),
        ({"start_timeout": float("inf")}, r"RayPlacement.start_timeout must be a positive number of seconds"),
    ],
)
def test_a_wrong_value_is_refused_by_name(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RayPlacement(**kwargs)  # type: ignore[arg-type]


@needs_ray
def test_it_is_frozen_and_its_mappings_are_copies() -> None:
    resources = {"GPU": 1}
    placement = RayPlacement(resources=resources, env={"A": "b"})
    resources["GPU"] = 2
    assert placement.resources["GPU"] == 1
    with pytest.raises(TypeError):
        placement.env["A"] = "c"  # type: ignore[index]


def test_without_ray_it_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without Ray finds
    with pytest.raises(ConfigError, match=r"RayPlacement needs Ray.*pip install 'pyisolate\[ray\]'"):
        pyisolate.RayPlacement(resources={"GPU": 1})


@needs_ray
def test_a_placement_makes_the_extension_remote_and_must_be_a_ray_placement(tmp_path) -> None:
    from pyisolate import ExtensionConfig

    config = ExtensionConfig(name="placed", module_path=tmp_path / "on-the-node", placement=RayPlacement())
    assert config.remote is True  # it joins over the listener; its folder is the node's
    with pytest.raises(ConfigError, match=r"ExtensionConfig.placement \(extension 'placed'\) must be a "
                                          r"pyisolate.RayPlacement"):
        ExtensionConfig(name="placed", module_path=tmp_path, placement={"resources": {"GPU": 1}})
    with pytest.raises(ConfigError, match="needs isolated=True"):
        ExtensionConfig(name="placed", module_path=tmp_path, placement=RayPlacement(), isolated=False)
