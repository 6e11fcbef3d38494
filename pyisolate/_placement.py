"""Where a worker runs when it is not a child of the host: ``RayPlacement``, validated at construction.

Only the value lives here (the config checks it where it is written); ``pyisolate._host.placement``
asks the Ray cluster to start the worker's process on a node that has the resources.
"""

from __future__ import annotations

import importlib.util
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

__all__ = ["RAY_EXTRA", "RayPlacement", "require_ray"]

#: How to install what RayPlacement needs; named in every error that says Ray is missing.
RAY_EXTRA = "pip install 'pyisolate[ray]'"
#: Resources Ray takes as keywords of their own rather than in ``resources=``.
_KEYWORDS = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": "memory"}


def require_ray(what: str = "RayPlacement") -> None:
    """Raise ConfigError naming the extra when Ray is not installed (looked up, not imported)."""
    try:
        found = importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError(f"{what} needs Ray, which is not installed in the host's environment; {RAY_EXTRA}")


@dataclass(frozen=True, kw_only=True)
class RayPlacement:
    """Start an extension's worker on a node of a running Ray cluster that has the resources.

    The Ray task only starts the worker's process and reports how it ended; the worker joins
    the host's broker over tcp, so no call, value or tensor goes through Ray. See
    docs/guides/ray.md.

    Attributes:
        resources: What the node must have and Ray reserves while the worker runs, such as
            ``{"GPU": 1}`` or a custom resource ``{"big_disk": 1}``. "CPU", "GPU" and "memory"
            (bytes) are Ray's own; any other name is a custom resource a node was started with.
            Quantities above 1 must be whole numbers (Ray's rule for fractional resources).
        num_cpus: CPUs reserved, 1 by default (the worker is one busy process); the same as
            ``resources["CPU"]``, give one or the other.
        address: The cluster to join: None uses ``RAY_ADDRESS`` if set, else ``"auto"`` (a cluster
            started on this machine with ``ray start``); ``"HOST:PORT"`` for a head's GCS, or
            ``"ray://HOST:PORT"`` for Ray Client. pyisolate never starts a cluster itself.
            Where the host process already called ``ray.init()``, that connection is used.
        env: Variables set for the worker's process, over the node's environment (Ray's own
            ``RAY_*`` variables removed, the devices Ray assigned, such as CUDA_VISIBLE_DEVICES, kept).
        start_timeout: Seconds to wait for a node with the resources to take the worker (an
            autoscaler may add one meanwhile); then it fails with PlacementError saying what
            the nodes offer.
        connect: The host's listener as the nodes reach it (``tcp://HOST:PORT``). None: the
            manager's ``listen_endpoint``, its wildcard address (0.0.0.0) replaced by this
            machine's own address.
        python: The interpreter on the node that has pyisolate installed (None: the host's own
            path, for nodes built from the same image).
        venv_root: Where the node builds the extension's venv (None: the host's
            ``venv_root_path``, the same path there).
    """

    resources: Mapping[str, float] = field(default_factory=dict)
    num_cpus: float | None = None
    address: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    start_timeout: float = 120.0
    connect: str | None = None
    python: str | None = None
    venv_root: str | None = None

    def __post_init__(self) -> None:
        require_ray()
        where = "RayPlacement"
        if not isinstance(self.resources, Mapping):
            raise ConfigError(f"{where}.resources must map resource names to quantities, like {{'GPU': 1}}, "
                              f"got {self.resources!r}")
        resources: dict[str, float] = {}
        for name, quantity in self.resources.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{where}.resources: a resource name must be a non-empty string, got {name!r}")
            resources[name] = _quantity(f"{where}.resources[{name!r}]", quantity)
        if self.num_cpus is not None:
            if "CPU" in resources:
                raise ConfigError(f"{where}: both num_cpus={self.num_cpus!r} and resources['CPU'] are given; "
                                  "give one of them")
            if isinstance(self.num_cpus, bool) or not isinstance(self.num_cpus, (int, float)) or not (
                    math.isfinite(self.num_cpus) and self.num_cpus >= 0):
                raise ConfigError(f"{where}.num_cpus must be a number of CPUs >= 0, got {self.num_cpus!r}")
            if self.num_cpus:
                resources["CPU"] = _quantity(f"{where}.num_cpus", self.num_cpus)
            else:
                resources["CPU"] = 0.0  # reserve none: the worker shares the node's CPUs
        object.__setattr__(self, "resources", types.MappingProxyType(resources))
        if self.address is not None:
            if not isinstance(self.address, str) or not self.address.strip():
                raise ConfigError(f"{where}.address must be None, 'auto', 'HOST:PORT' or 'ray://HOST:PORT', "
                                  f"got {self.address!r}")
            if self.address == "local":
                raise ConfigError(f"{where}.address='local' would start a new Ray cluster inside the host; "
                                  "start one with `ray start --head` and give its address (or 'auto')")
        if not isinstance(self.env, Mapping) or not all(
            isinstance(k, str) and k and "=" not in k and isinstance(v, str) for k, v in self.env.items()
        ):
            raise ConfigError(f"{where}.env must map variable names to strings, got {self.env!r}")
        object.__setattr__(self, "env", types.MappingProxyType(dict(self.env)))
        if isinstance(self.start_timeout, bool) or not isinstance(self.start_timeout, (int, float)) or not (
                self.start_timeout > 0 and math.isfinite(self.start_timeout)):
            raise ConfigError(f"{where}.start_timeout must be a positive number of seconds, got {self.start_timeout!r}")

        if self.connect is not None and not (isinstance(self.connect, str) and self.connect.startswith("tcp://")):
            raise ConfigError(f"{where}.connect must be the host's listener as the nodes reach it, "
                              f"'tcp://HOST:PORT', got {self.connect!r}")
        for field_name in ("python", "venv_root"):
            value = getattr(self, field_name)
            if value is not None and not (isinstance(value, str) and value.startswith("/")):
                raise ConfigError(f"{where}.{field_name} must be an absolute path on the nodes, got {value!r}")

    def __hash__(self) -> int:
        return hash((tuple(sorted(self.resources.items())), self.address, tuple(sorted(self.env.items())),
                     self.start_timeout))

    def actor_options(self) -> dict[str, Any]:
        """The options of the Ray actor that runs the worker: resources in Ray's keywords."""
        options: dict[str, Any] = {"num_cpus": 1.0, "resources": {}}
        for name, quantity in self.resources.items():
            if name in _KEYWORDS:
                options[_KEYWORDS[name]] = quantity
            else:
                options["resources"][name] = quantity
        return options

    def describe(self) -> str:
        """The request in words, for messages: ``CPU=1, GPU=1``."""
        wanted = {"CPU": 1.0, **self.resources}
        return ", ".join(f"{name}={quantity:g}" for name, quantity in sorted(wanted.items()))


def _quantity(where: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where} must be a positive number, got {value!r}")
    if value > 1 and value != int(value):
        raise ConfigError(f"{where} is {value!r}: Ray takes fractions of one unit only (0.5) or whole numbers "
                          f"(2); use {math.ceil(value)}")
    return float(value)
