"""Package sources: what is refused and how it is said, the manifest keys, the venv fingerprint,
and choosing the CUDA wheel that fits a torch build (pure: the torch and the tags are arguments)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from packaging.tags import Tag, sys_tags

from pyisolate import ConfigError, ExtensionConfig
from pyisolate._envs import inventory
from pyisolate._envs import uv as _uv
from pyisolate._envs import venv as _venv
from pyisolate._envs.wheels import Link, TorchBuild, choose, matches, parse_page, read_index, redact
from pyisolate._sources import CudaWheels, PackageSources
from tests.support import ext

CUDA = {"index_url": "https://wheels.example/cu128/", "packages": ["flash-attn"]}


def _config(**kwargs: object) -> ExtensionConfig:
    return ExtensionConfig(**{"name": "good", "module_path": ext("ok"), **kwargs})  # type: ignore[arg-type]


# -- what ExtensionConfig refuses --------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"index_url": "ftp://mirror.example/simple"},
         "ExtensionConfig.index_url (extension 'good'): 'ftp://mirror.example/simple' is not an http://, https:// "
         "or file:// URL; give the index's address"),
        ({"index_url": "https:///simple"}, "'https:///simple' has no host; write it as https://<host>/<path>"),
        ({"index_url": "mirror.example/simple"}, "is not an http://, https:// or file:// URL"),
        ({"index_url": "https://mirror.example:port/"}, "is not a valid URL"),
        ({"index_url": "https://mirror.example/my index"}, "holds spaces or control characters; percent-encode"),
        ({"extra_index_urls": "https://mirror.example/simple"},
         "ExtensionConfig.extra_index_urls (extension 'good') must be a list of URLs"),
        ({"extra_index_urls": ["https://a.example/", "javascript:alert(1)"]},
         "ExtensionConfig.extra_index_urls[1] (extension 'good'): 'javascript:alert(1)' is not an http://"),
        ({"find_links": ["/no/such/wheels"]},
         "ExtensionConfig.find_links[0] (extension 'good'): '/no/such/wheels' does not exist; give a folder that "
         "holds wheels"),
        ({"find_links": "/tmp"}, "ExtensionConfig.find_links (extension 'good') must be a list of folders or URLs"),
        ({"find_links": ["file:///no/such/wheels"]}, "'/no/such/wheels' does not exist"),
        ({"find_links": ["file://elsewhere/wheels"]}, "is not a local file URL; write file:///absolute/path"),
        ({"cuda_wheels": {**CUDA, "packages": ["flash-attn"]}, "dependencies": ["numpy"]},
         "ExtensionConfig.cuda_wheels.packages (extension 'good') names 'flash-attn', which is not among the "
         "dependencies ('numpy'); add 'flash-attn' to the dependencies, or take it off this list"),
        ({"cuda_wheels": {"packages": ["flash-attn"]}, "dependencies": ["flash-attn"]},
         "ExtensionConfig.cuda_wheels (extension 'good') needs index_url (or index_urls)"),
        ({"cuda_wheels": {**CUDA, "index": "x"}, "dependencies": ["flash-attn"]},
         "unknown key 'index'; known keys: index_url, index_urls, packages, package_map"),
        ({"cuda_wheels": {**CUDA, "packages": []}},
         "ExtensionConfig.cuda_wheels.packages (extension 'good') is empty"),
        ({"cuda_wheels": {**CUDA, "packages": ["flash-attn>=2"]}, "dependencies": ["flash-attn>=2"]},
         "ExtensionConfig.cuda_wheels.packages[0] (extension 'good'): 'flash-attn>=2' is not a package name; give "
         "the name alone"),
        ({"cuda_wheels": {**CUDA, "package_map": {"other": "x"}}, "dependencies": ["flash-attn"]},
         "ExtensionConfig.cuda_wheels.package_map['other'] (extension 'good'): 'other' is not in "
         "ExtensionConfig.cuda_wheels.packages"),
        ({"cuda_wheels": {**CUDA, "index_url": "ftp://x/"}, "dependencies": ["flash-attn"]},
         "ExtensionConfig.cuda_wheels.index_url (extension 'good'): 'ftp://x/' is not an http://"),
        ({"cuda_wheels": ["flash-attn"]}, "ExtensionConfig.cuda_wheels (extension 'good') must be a table"),
        ({"share_torch_no_deps": ["six"], "dependencies": ["six"]},
         "ExtensionConfig.share_torch_no_deps (extension 'good') is only for share_torch=True (it keeps those "
         "packages from pulling a torch of their own); set share_torch=True, or remove share_torch_no_deps"),
        ({"share_torch_no_deps": ["six"], "share_torch": True, "dependencies": ["numpy"]},
         "ExtensionConfig.share_torch_no_deps (extension 'good') names 'six', which is not among the dependencies"),
        ({"share_torch_no_deps": "six", "share_torch": True, "dependencies": ["six"]},
         "must be a list of package names, got 'six'; write ['six']"),
    ],
)  # fmt: skip
def test_bad_sources_are_refused_naming_the_field_and_the_fix(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _config(**kwargs)
    assert message in str(info.value)


def test_a_file_is_not_a_folder_of_wheels(tmp_path: Path) -> None:
    (tmp_path / "one.whl").write_bytes(b"")
    with pytest.raises(ConfigError, match="is a file, not a folder; give the folder that holds it"):
        _config(find_links=[tmp_path / "one.whl"])


def test_sources_are_kept_in_their_plain_form(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "wheels").mkdir()
    monkeypatch.chdir(tmp_path)
    config = _config(
        dependencies=["Flash_Attn>=2", "some-addon", "torch"], share_torch=True,
        index_url=" https://download.pytorch.org/whl/cu128 ", extra_index_urls=["http://127.0.0.1:8000/simple"],
        find_links=["wheels", "https://wheels.example/links.html", (tmp_path / "wheels").as_uri()],
        cuda_wheels={"index_url": "https://a.example/", "index_urls": ["https://b.example/", "https://a.example/"],
                     "packages": ["flash_attn"], "package_map": {"Flash-Attn": "Flash_Attn_CU128"}},
        share_torch_no_deps=["Some_Addon"],
    )  # fmt: skip
    assert config.index_url == "https://download.pytorch.org/whl/cu128"
    assert config.extra_index_urls == ("http://127.0.0.1:8000/simple",)
    assert config.find_links == (str(tmp_path / "wheels"), "https://wheels.example/links.html",
                                 (tmp_path / "wheels").as_uri())  # fmt: skip
    assert config.cuda_wheels == {"index_urls": ["https://a.example/", "https://b.example/"],
                                  "packages": ["flash-attn"], "package_map": {"flash-attn": "flash-attn-cu128"}}
    assert config.share_torch_no_deps == ("some-addon",)
    sources = config.sources
    assert sources.no_deps == ("some-addon",) and sources.cuda_wheels is not None
    assert sources.cuda_wheels.distribution("FLASH.attn") == "flash-attn-cu128"
    assert sources.uv_options() == [
        "--default-index", "https://download.pytorch.org/whl/cu128",
        "--extra-index-url", "http://127.0.0.1:8000/simple",
        "--find-links", str(tmp_path / "wheels"), "--find-links", "https://wheels.example/links.html",
        "--find-links", (tmp_path / "wheels").as_uri(),
    ]  # fmt: skip
    assert PackageSources.from_dict(json.loads(json.dumps(sources.as_dict()))) == sources
    assert _config().sources == PackageSources() and not PackageSources()


def test_unreadable_recorded_sources_are_refused() -> None:
    with pytest.raises(ConfigError, match="are not readable; rebuild the venv"):
        PackageSources.from_dict({"cuda_wheels": {"packages": []}})


# -- the manifest ------------------------------------------------------------------------------


def _extension(root: Path, manifest: str) -> Path:
    directory = root / "ext"
    directory.mkdir()
    (directory / "__init__.py").write_text("")
    (directory / "pyproject.toml").write_text(manifest)
    return directory


MANIFEST = """\
[project]
name = "sourced"
dependencies = ["flash-attn>=2", "addon", "local-thing"]

[tool.pyisolate]
share_torch = true
index_url = "https://download.pytorch.org/whl/cu128"
extra_index_urls = ["https://mirror.example/simple?token=a=b"]
find_links = ["vendor/wheels"]
share_torch_no_deps = ["addon"]

[tool.pyisolate.cuda_wheels]
index_urls = ["https://wheels.example/cuda/"]
packages = ["flash_attn"]
package_map = { flash_attn = "flash-attn-cu128" }
"""


def test_manifest_sets_the_sources_relative_to_the_extension(tmp_path: Path) -> None:
    directory = _extension(tmp_path, MANIFEST)
    (directory / "vendor" / "wheels").mkdir(parents=True)
    config = ExtensionConfig.from_path(directory)
    assert config.index_url == "https://download.pytorch.org/whl/cu128"
    assert config.extra_index_urls == ("https://mirror.example/simple?token=a=b",)
    assert config.find_links == (str(directory / "vendor" / "wheels"),)
    assert config.cuda_wheels == {"index_urls": ["https://wheels.example/cuda/"], "packages": ["flash-attn"],
                                  "package_map": {"flash-attn": "flash-attn-cu128"}}  # fmt: skip
    assert config.share_torch_no_deps == ("addon",)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("vendor/wheels", "missing/wheels"),
         "[tool.pyisolate].find_links[0]: '{dir}/missing/wheels' does not exist; give a folder that holds wheels "
         "(in a manifest, relative to the extension's folder)"),
        (('index_url = "https://download', 'index_url = "ssh://download'),
         "[tool.pyisolate].index_url: 'ssh://download.pytorch.org/whl/cu128' is not an http://, https:// or file://"),
        (('extra_index_urls = ["https', 'extra_index_urls = ["ftp'),
         "[tool.pyisolate].extra_index_urls[0]: 'ftp://mirror.example/simple?token=a=b' is not an http://"),
        (('packages = ["flash_attn"]', 'packages = ["numpy"]'),
         "[tool.pyisolate.cuda_wheels].package_map['flash_attn']: 'flash_attn' is not in "
         "[tool.pyisolate.cuda_wheels].packages"),
        (("\nindex_urls =", "\nindex_url_list ="), "[tool.pyisolate.cuda_wheels]: unknown key 'index_url_list'"),
        (('share_torch_no_deps = ["addon"]', 'share_torch_no_deps = "addon"'),
         "[tool.pyisolate].share_torch_no_deps must be a list of package names, e.g. share_torch_no_deps = "),
        (('share_torch_no_deps = ["addon"]', 'share_torch_no_deps = ["absent"]'),
         "ExtensionConfig.share_torch_no_deps (extension 'sourced') names 'absent', which is not among the "
         "dependencies ('flash-attn>=2', 'addon', 'local-thing'); add 'absent' to the dependencies, or take it off "
         "this list (settings read from {dir}/pyproject.toml)"),
        (("find_links", "find_link"), "[tool.pyisolate].find_link is not a pyisolate setting; did you mean "
                                      "'find_links'?"),
    ],
)  # fmt: skip
def test_manifest_source_errors_name_the_file_the_key_and_the_fix(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    old, new = change
    assert old in MANIFEST
    directory = _extension(tmp_path, MANIFEST.replace(old, new))
    (directory / "vendor" / "wheels").mkdir(parents=True)
    with pytest.raises(ConfigError) as info:
        ExtensionConfig.from_path(directory)
    assert str(info.value).startswith(f"{directory}/pyproject.toml: ") or "(settings read from" in str(info.value)
    assert message.format(dir=directory) in str(info.value)


# -- the venv: fingerprint, passes, what `env list` reads back ---------------------------------


def test_every_source_is_in_the_fingerprint_and_unset_ones_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in _venv._CONTENT_ENV_VARS:
        monkeypatch.delenv(key, raising=False)
    deps = ["flash-attn", "addon"]
    base = _venv._fingerprint(deps, share_torch=True)
    assert _venv._fingerprint(deps, share_torch=True, sources=PackageSources()) == base  # older venvs stay valid
    cuda = CudaWheels(index_urls=("https://a.example/",), packages=("flash-attn",))
    variants = [
        PackageSources(index_url="https://a.example/"),
        PackageSources(extra_index_urls=("https://a.example/",)),
        PackageSources(extra_index_urls=("https://a.example/", "https://b.example/")),
        PackageSources(find_links=("/srv/wheels",)),
        PackageSources(find_links=("/srv/other",)),
        PackageSources(cuda_wheels=cuda),
        PackageSources(cuda_wheels=CudaWheels(index_urls=("https://b.example/",), packages=("flash-attn",))),
        PackageSources(cuda_wheels=CudaWheels(index_urls=cuda.index_urls, packages=cuda.packages,
                                              package_map={"flash-attn": "fa-cu128"})),
        PackageSources(no_deps=("addon",)),
        PackageSources(find_links=("/srv/wheels",), no_deps=("addon",)),
    ]  # fmt: skip
    prints = [_venv._fingerprint(deps, share_torch=True, sources=v) for v in variants]
    assert len({base, *prints}) == len(variants) + 1
    assert prints == [_venv._fingerprint(deps, share_torch=True, sources=v) for v in variants]  # and stable
    # The CUDA wheel chosen is the one built for the host's torch: another torch, another venv.
    monkeypatch.setattr(_venv, "_host_torch", lambda: "2.12.0+cu126")
    assert _venv._fingerprint(deps, share_torch=True, sources=variants[5]) != prints[5]
    assert _venv._fingerprint(deps, share_torch=True, sources=variants[3]) == prints[3]


def test_the_passes_split_the_requirements() -> None:
    sources = PackageSources(
        cuda_wheels=CudaWheels(index_urls=("https://a.example/",), packages=("flash-attn",),
                               package_map={"flash-attn": "flash-attn-cu128"}),
        no_deps=("addon",),
    )  # fmt: skip
    deps = ["numpy<2", "Flash_Attn>=2", "addon==1; python_version >= '3'", "other"]
    main, wheels, loose, later = _venv._passes(deps, sources)
    assert (main, wheels, loose) == (["numpy<2", "other"], ["Flash_Attn>=2"], ["addon==1; python_version >= '3'"])
    assert later == ["flash-attn", "flash-attn-cu128", "addon"]
    assert _venv._passes(deps, PackageSources())[:3] == (deps, [], [])
    with pytest.raises(ConfigError, match="share_torch_no_deps names 'addon', which is not among the dependencies"):
        _venv._passes(["numpy"], PackageSources(no_deps=("addon",)))


def test_install_command_of_a_pass(tmp_path: Path) -> None:
    python = tmp_path / "bin" / "python"
    command = _uv.install_command(python, ["addon"], tmp_path / "x.txt", options=["--find-links", "/w"],
                                     no_deps=True)  # fmt: skip
    assert command[1:] == ["pip", "install", "--python", str(python), "--no-config", "--color", "never", "--no-deps",
                           "--find-links", "/w", "--excludes", str(tmp_path / "x.txt"), "addon"]  # fmt: skip


def test_env_list_reads_the_sources_back(tmp_path: Path) -> None:
    sources = PackageSources(find_links=("/srv/wheels",), no_deps=("addon",))
    venv = tmp_path / "ext"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    _venv._write_marker(venv, _venv._fingerprint(["addon"], share_torch=False, sources=sources), ["addon"], False,
                        sources)  # fmt: skip
    (info,) = inventory.list_venvs(tmp_path)
    assert (info.status, info.sources) == (inventory.READY, sources)
    data = json.loads((venv / _venv._MARKER).read_text())
    data["sources"] = {"find_links": ["/srv/elsewhere"], "no_deps": ["addon"]}
    (venv / _venv._MARKER).write_text(json.dumps(data))
    (info,) = inventory.list_venvs(tmp_path)
    assert info.status == inventory.STALE


# -- choosing a CUDA wheel ----------------------------------------------------------------------

CPU = TorchBuild("2.13.0", None)
CU128 = TorchBuild("2.6.0", "12.8")
LINUX = [Tag("cp311", "cp311", "manylinux_2_28_x86_64"), Tag("cp311", "abi3", "manylinux_2_28_x86_64"),
         Tag("py3", "none", "any")]  # fmt: skip


@pytest.mark.parametrize(
    ("label", "torch", "fits"),
    [
        ("pt213cpu", CPU, True), ("torch2.13cpu", CPU, True), ("pt2130", CPU, True), ("torch2.13.0", CPU, True),
        ("cpu", CPU, True), (None, CPU, True), ("pt213", CPU, True), ("pt212cpu", CPU, False),
        ("pt213cu128", CPU, False), ("pt213rocm6.2", CPU, False), ("pt21", CPU, False), ("torch2.1cpu", CPU, False),
        ("cu128torch2.6", CU128, True), ("pt26cu128", CU128, True), ("cu12torch260", CU128, True),
        ("cu128", CU128, True), ("pt26cu126", CU128, False), ("pt26cpu", CU128, False), ("pt26", CU128, True),
        ("cu118pt26", CU128, False), ("pt27cu128", CU128, False),
    ],
)  # fmt: skip
def test_a_local_label_fits_a_torch_build(label: str | None, torch: TorchBuild, fits: bool) -> None:
    assert matches(label, torch)[0] is fits


def _links(*filenames: str) -> list[Link]:
    return [Link(name, f"https://wheels.example/{name}") for name in filenames]


def test_choose_takes_the_highest_fitting_version_that_installs_here() -> None:
    links = _links(
        "fa-2.8+pt212cpu-cp311-cp311-manylinux_2_28_x86_64.whl",  # another torch
        "fa-2.8+pt213cu128-cp311-cp311-manylinux_2_28_x86_64.whl",  # another CUDA
        "fa-2.8+pt213cpu-cp312-cp312-manylinux_2_28_x86_64.whl",  # another Python
        "fa-2.8+pt213cpu-cp311-cp311-win_amd64.whl",  # another platform
        "fa-2.8.tar.gz",  # no wheel
        "other-3.0+pt213cpu-py3-none-any.whl",  # another package
        "fa-2.7+pt213cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
        "fa-2.7-py3-none-any.whl",
        "fa-2.6+torch2.13cpu-py3-none-any.whl",
    )  # fmt: skip
    chosen = choose(links, "FA", CPU, tags=LINUX)
    assert chosen is not None and chosen.filename == "fa-2.7+pt213cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    assert choose(links, "fa", CPU, specifier="<2.7", tags=LINUX).filename == "fa-2.6+torch2.13cpu-py3-none-any.whl"
    assert choose(links, "fa", CU128, tags=LINUX).filename == "fa-2.7-py3-none-any.whl"  # no label: fits any
    assert choose(links[:7], "fa", CU128, tags=LINUX) is None
    assert choose(links, "fa", CPU, specifier=">=3", tags=LINUX) is None


def test_choose_prefers_a_named_torch_then_the_most_specific_tag() -> None:
    links = _links("fa-1.0-cp311-cp311-manylinux_2_28_x86_64.whl", "fa-1.0+pt213-py3-none-any.whl",
                   "fa-1.0+pt213-cp311-abi3-manylinux_2_28_x86_64.whl")  # fmt: skip
    assert choose(links, "fa", CPU, tags=LINUX).filename == "fa-1.0+pt213-cp311-abi3-manylinux_2_28_x86_64.whl"
    assert choose(links[:2], "fa", CPU, tags=LINUX).filename == "fa-1.0+pt213-py3-none-any.whl"
    newer = _links("fa-1.0.1-py3-none-any.whl", *(link.filename for link in links))
    assert choose(newer, "fa", CPU, tags=LINUX).filename == "fa-1.0.1-py3-none-any.whl"  # the version comes first


def test_choose_skips_yanked_wheels_and_those_for_another_python() -> None:
    links = [Link("fa-2.0+pt213-py3-none-any.whl", "https://w.example/a", yanked=True),
             Link("fa-1.9+pt213-py3-none-any.whl", "https://w.example/b", requires_python=">=3.99"),
             Link("fa-1.8+pt213-py3-none-any.whl", "https://w.example/c", requires_python=">=3.8,<4")]  # fmt: skip
    assert choose(links, "fa", CPU, tags=LINUX, python="3.11.7").url == "https://w.example/c"


def test_choose_uses_this_interpreters_tags() -> None:
    here = next(iter(sys_tags()))
    links = _links(f"fa-1.0+pt213-{here}.whl", "fa-2.0+pt213-cp27-cp27m-win32.whl")
    assert choose(links, "fa", CPU, tags=list(sys_tags())).filename == f"fa-1.0+pt213-{here}.whl"


def test_torch_build_tokens() -> None:
    assert CPU.torch_tokens() == {"213", "2.13", "2130", "2.13.0"}
    assert CPU.cuda_tokens() == {"cpu"} and CU128.cuda_tokens() == {"cu128", "cu12"}
    assert "torch 2.13.0 (CPU only)" in CPU.describe() and "pt213" in CPU.describe()
    assert "cu128 or cu12" in CU128.describe()


# -- index pages -------------------------------------------------------------------------------

PAGE = """<!DOCTYPE html><html><head><meta name="pypi:repository-version" content="1.0"></head><body>
<a href="../../files/fa-1.0%2Bpt213-py3-none-any.whl#sha256=abc">fa-1.0+pt213-py3-none-any.whl</a>
<a href="https://cdn.example/fa-1.1-py3-none-any.whl#egg=fa" data-requires-python="&gt;=3.8">fa-1.1</a>
<a href="/abs/fa-1.2-py3-none-any.whl" data-yanked="">fa-1.2</a>
<a href="ftp://old.example/fa-0.1-py3-none-any.whl">fa-0.1</a>
<a href="file:///etc/fa-0.2-py3-none-any.whl">fa-0.2</a>
</body></html>"""


def test_an_index_page_becomes_links() -> None:
    links = parse_page(PAGE, "https://wheels.example/simple/fa/")
    assert links == [
        Link("fa-1.0+pt213-py3-none-any.whl", "https://wheels.example/files/fa-1.0%2Bpt213-py3-none-any.whl#sha256=abc"),
        Link("fa-1.1-py3-none-any.whl", "https://cdn.example/fa-1.1-py3-none-any.whl", requires_python=">=3.8"),
        Link("fa-1.2-py3-none-any.whl", "https://wheels.example/abs/fa-1.2-py3-none-any.whl", yanked=True),
    ]  # fmt: skip
    based = parse_page('<base href="https://mirror.example/x/"><a href="fa-1.0-py3-none-any.whl">a</a>', "https://w/")
    assert based[0].url == "https://mirror.example/x/fa-1.0-py3-none-any.whl"
    assert len(parse_page(PAGE, "file:///srv/simple/fa/")) == 4  # a local index may link local files


def test_read_index_from_a_file_index(tmp_path: Path) -> None:
    (tmp_path / "simple" / "flash-attn").mkdir(parents=True)
    (tmp_path / "simple" / "flash-attn" / "index.html").write_text(PAGE)
    links = read_index((tmp_path / "simple").as_uri(), "Flash_Attn", timeout=5)
    assert links[0].url == f"{tmp_path.as_uri()}/files/fa-1.0%2Bpt213-py3-none-any.whl#sha256=abc"
    assert read_index((tmp_path / "simple").as_uri() + "/", "absent", timeout=5) == []


def test_messages_never_show_an_index_password() -> None:
    assert redact("https://me:s3cret@wheels.example:8443/simple/") == "https://me:***@wheels.example:8443/simple/"
    assert redact("https://wheels.example/simple/") == "https://wheels.example/simple/"


def test_the_host_torch_is_read() -> None:
    torch = TorchBuild.of_host()
    if torch is None:
        pytest.skip("no torch in this host")
    import torch as real

    assert (torch.version, torch.cuda) == (real.__version__.split("+")[0], real.version.cuda)
