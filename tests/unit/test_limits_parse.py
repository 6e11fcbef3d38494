"""Limits as the user writes them: sizes, errors that name where, the field and the fix, ceilings."""

from __future__ import annotations

import math

import pytest

from pyisolate.errors import ConfigError
from pyisolate._limits import Limits

GiB, MiB = 1024**3, 1024**2
WHERE = "ExtensionConfig.limits"


@pytest.mark.parametrize(
    ("written", "size"),
    [
        ("4GiB", 4 * GiB),
        ("512MiB", 512 * MiB),
        ("2G", 2 * GiB),
        ("1.5GB", 1_500_000_000),
        (" 8 gib ", 8 * GiB),
        ("100M", 100 * MiB),
        ("64mb", 64_000_000),
        ("1T", 1024**4),
        ("4_000_000_000", 4_000_000_000),
        (4_000_000_000, 4_000_000_000),
        (4e9, 4_000_000_000),
        ("0.5GiB", GiB // 2),
    ],
)
def test_sizes(written, size):
    limits = Limits.parse({"memory": written}, where=WHERE)
    assert limits is not None and limits.memory == size


def test_every_field_and_the_empty_cases():
    limits = Limits.parse({"memory": "4GiB", "cpu": 1, "processes": 64, "open_files": 1024}, where=WHERE)
    assert limits == Limits(memory=4 * GiB, cpu=1.0, processes=64, open_files=1024)
    assert isinstance(limits.cpu, float)
    assert Limits.parse(None, where=WHERE) is None
    assert Limits.parse(limits, where=WHERE) is limits
    assert Limits.parse({}, where=WHERE) == Limits()
    assert Limits.parse({"memory": None}, where=WHERE) == Limits()  # TOML has no null, but Python callers might


@pytest.mark.parametrize(
    ("written", "needles"),
    [
        ({"memroy": "4GiB"}, ["unknown limit 'memroy'", "did you mean 'memory'"]),
        ({"open-files": 10}, ["did you mean 'open_files'"]),
        ({"gpu": 1}, ["unknown limit 'gpu'", "the limits are memory, cpu, processes, open_files"]),
        ({"memory": "4 gigs"}, ["'4 gigs' is not a size", "'4GiB'"]),
        ({"memory": "GiB"}, ["is not a size"]),
        ({"memory": "1.2.3G"}, ["is not a size"]),
        ({"memory": "-4GiB"}, ["is not a size"]),
        ({"memory": True}, [".memory", "True is not a size", "'4GiB'"]),
        ({"memory": 0}, [".memory", "must be more than 0", "leave memory out"]),
        ({"memory": -1}, ["must be more than 0"]),
        ({"memory": 512}, ["cannot even start a worker", "did you mean '512MiB'"]),
        ({"memory": 1.5}, ["1.5 is not a size"]),
        ({"cpu": 0}, [".cpu", "too little CPU", "at least 0.01"]),
        ({"cpu": -1.5}, ["too little CPU"]),
        ({"cpu": True}, [".cpu", "not a number of cores", "1.5"]),
        ({"cpu": "1.5"}, ["not a number of cores"]),
        ({"cpu": math.nan}, ["not a number of cores"]),
        ({"cpu": math.inf}, ["not a number of cores"]),
        ({"processes": 0}, [".processes", "must be more than 0", "leave processes out"]),
        ({"processes": False}, [".processes", "not a whole number"]),
        ({"processes": 1.5}, ["not a whole number"]),
        ({"open_files": -3}, [".open_files", "must be more than 0"]),
        ({"open_files": "1024"}, [".open_files", "not a whole number"]),
        (["memory", "4GiB"], ["must be a table", "list"]),
    ],
)
def test_errors_name_where_the_field_and_the_fix(written, needles):
    with pytest.raises(ConfigError) as info:
        Limits.parse(written, where=WHERE)
    message = str(info.value)
    assert message.startswith(WHERE), message
    for needle in needles:
        assert needle in message, message


def test_direct_construction_is_checked_too():
    with pytest.raises(ConfigError, match=r"Limits\.processes: -1 must be more than 0"):
        Limits(processes=-1)
    with pytest.raises(ConfigError, match=r"Limits\.memory: '4 gigs' is not a size"):
        Limits(memory="4 gigs")  # type: ignore[arg-type]
    assert Limits(memory="4GiB").memory == 4 * GiB  # type: ignore[arg-type]  # sizes in words, as in parse


def test_within_takes_what_is_missing_from_the_ceiling():
    ceiling = Limits(memory=8 * GiB, cpu=2.0, processes=128)
    mine = Limits(memory=4 * GiB, open_files=1024)
    assert mine.within(ceiling) == Limits(memory=4 * GiB, cpu=2.0, processes=128, open_files=1024)
    assert mine.within(None) is mine
    assert ceiling.within(ceiling) == ceiling  # asking for exactly the ceiling is fine
    assert Limits().within(ceiling) == ceiling


@pytest.mark.parametrize(
    ("mine", "needles"),
    [
        (Limits(memory=16 * GiB), ["ExtensionConfig.limits.memory: 16 GiB", "ceiling of 8 GiB", "at most 8 GiB"]),
        (Limits(cpu=2.5), ["limits.cpu: 2.5", "ceiling of 2", "raise the ceiling"]),
        (Limits(processes=129), ["limits.processes: 129", "ceiling of 128"]),
        (Limits(open_files=4097), ["limits.open_files: 4097", "ceiling of 4096"]),
    ],
)
def test_within_only_narrows(mine, needles):
    ceiling = Limits(memory=8 * GiB, cpu=2.0, processes=128, open_files=4096)
    with pytest.raises(ConfigError) as info:
        mine.within(ceiling, where=WHERE)
    for needle in needles:
        assert needle in str(info.value)


def test_describe():
    assert Limits(memory=4 * GiB, cpu=1.5, processes=64, open_files=1024).describe() == (
        "memory 4 GiB, cpu 1.5, processes 64, open files 1024"
    )
    assert Limits(memory=1_500_000_000, cpu=2).describe() == "memory 1.4 GiB, cpu 2"
    assert Limits(memory=512 * MiB).describe() == "memory 512 MiB"
    assert Limits().describe() == "no limits"
