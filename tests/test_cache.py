"""The compiled-kernel cache verifies what it reads: a damaged entry is a miss, rebuilt and
replaced atomically; files honour the umask. NVRTC runs on CPU; two real compiles in all,
the damaged-entry cycles replay the first compile's NVRTC output."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from cupy.cuda import nvrtc

from flashmoe_gen import compile as fcompile
from flashmoe_gen.compile import compile_source, write_if_changed
from flashmoe_gen.config import KernelConfig
from flashmoe_gen.errors import CacheError, FlashMoEError
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.render import render

TINY = MoEProblem(64, 32, 1, 1, tokens_per_rank=8)  # compiles in about a second
ARCH = "sm_80"


@pytest.fixture(scope="module")
def gen():
    return render(TINY, KernelConfig.default(TINY, ARCH))


@pytest.fixture(scope="module")
def pristine(gen, tmp_path_factory):
    """One real compile (umask 027): the entry's files and what NVRTC returned."""
    root = tmp_path_factory.mktemp("pristine")
    old = os.umask(0o027)
    try:
        mod = compile_source(gen, ARCH, cache_dir=root)
    finally:
        os.umask(old)
    cubin = Path(mod.cubin_path)
    files = {p.suffix: p for p in cubin.parent.iterdir()}
    return {"mod": mod, "dir": cubin.parent, "stem": cubin.stem, "files": files,
            "bytes": {s: p.read_bytes() for s, p in files.items()}}


def test_entry_records_the_cubins_hash_and_size_and_honours_the_umask(pristine):
    assert not pristine["mod"].cache_hit
    assert sorted(pristine["files"]) == [".cu", ".cubin", ".json"]  # no temp file left
    cubin, meta = pristine["bytes"][".cubin"], json.loads(pristine["bytes"][".json"])
    assert meta["cubin_size"] == len(cubin) > 0
    assert meta["cubin_sha256"] == hashlib.sha256(cubin).hexdigest()
    for p in pristine["files"].values():  # 0666 & ~027, not mkstemp's 0600
        assert p.stat().st_mode & 0o777 == 0o640, p


def fake_nvrtc(monkeypatch, pristine) -> list[str]:
    """NVRTC replaying the pristine compile (its cubin, log and lowered names); counts runs."""
    mod, runs = pristine["mod"], []
    monkeypatch.setattr(nvrtc, "createProgram", lambda code, name, *a: runs.append(name) or 1)
    monkeypatch.setattr(nvrtc, "addNameExpression", lambda prog, expr: None)
    monkeypatch.setattr(nvrtc, "compileProgram", lambda prog, options: None)
    monkeypatch.setattr(nvrtc, "getProgramLog", lambda prog: mod.log)
    monkeypatch.setattr(nvrtc, "getLoweredName", lambda prog, expr: mod.lowered[expr])
    monkeypatch.setattr(nvrtc, "getCUBIN", lambda prog: pristine["bytes"][".cubin"])
    monkeypatch.setattr(nvrtc, "destroyProgram", lambda prog: None)
    return runs


def flip_one_byte(b: bytes) -> bytes:
    i = len(b) // 2
    return b[:i] + bytes([b[i] ^ 0x01]) + b[i + 1:]


DAMAGE = {
    "cubin emptied": (".cubin", lambda b: b""),
    "cubin halved": (".cubin", lambda b: b[:len(b) // 2]),
    "cubin random bytes": (".cubin", lambda b: os.urandom(len(b))),
    "cubin one byte flipped": (".cubin", flip_one_byte),
    "cubin missing": (".cubin", None),
    "metadata missing": (".json", None),
    "metadata truncated": (".json", lambda b: b[:len(b) // 2]),
    "metadata foreign JSON": (".json", lambda b: b'["not", "our", "metadata"]'),
    "metadata other object": (".json", lambda b: b'{"lowered": 1}'),
    "metadata binary": (".json", lambda b: b"\xff\xfe\x00garbage"),
    "metadata without hash": (".json", lambda b: json.dumps(
        {k: v for k, v in json.loads(b).items() if not k.startswith("cubin_")}).encode()),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_entry_is_a_miss_rebuilt_and_replaced_atomically(
        damage, pristine, gen, tmp_path, monkeypatch):
    entry = tmp_path / ARCH
    shutil.copytree(pristine["dir"], entry)
    suffix, corrupt = DAMAGE[damage]
    target = entry / (pristine["stem"] + suffix)
    if corrupt is None:
        target.unlink()
    else:
        target.write_bytes(corrupt(target.read_bytes()))
    runs = fake_nvrtc(monkeypatch, pristine)
    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        assert Path(src).parent == Path(dst).parent  # a temp file beside its target
        replaced.append(Path(dst).suffix)
        real_replace(src, dst)

    monkeypatch.setattr(fcompile.os, "replace", spy)
    mod = compile_source(gen, ARCH, cache_dir=tmp_path)
    assert not mod.cache_hit and len(runs) == 1, damage
    assert sorted(replaced) == [".cubin", ".json"]  # the .cu was intact: left alone
    names = {pristine["stem"] + s for s in (".cu", ".cubin", ".json")}
    assert {p.name for p in entry.iterdir()} == names  # no temp file left
    for s in (".cubin", ".json"):
        assert (entry / (pristine["stem"] + s)).read_bytes() == pristine["bytes"][s]
    again = compile_source(gen, ARCH, cache_dir=tmp_path)
    assert again.cache_hit and len(runs) == 1
    assert again.lowered == pristine["mod"].lowered
    assert again.resources == pristine["mod"].resources




def test_a_real_recompile_repairs_a_flipped_byte(pristine, gen, tmp_path):
    shutil.copytree(pristine["dir"], tmp_path / ARCH)
    cubin = tmp_path / ARCH / (pristine["stem"] + ".cubin")
    cubin.write_bytes(flip_one_byte(cubin.read_bytes()))
    mod = compile_source(gen, ARCH, cache_dir=tmp_path)  # NVRTC for real
    assert not mod.cache_hit
    meta = json.loads((tmp_path / ARCH / (pristine["stem"] + ".json")).read_bytes())
    assert hashlib.sha256(cubin.read_bytes()).hexdigest() == meta["cubin_sha256"]
    assert compile_source(gen, ARCH, cache_dir=tmp_path).cache_hit


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_honour_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        write_if_changed(tmp_path / "a.cu", "text")
        fcompile._atomic_write(tmp_path / "sub" / "b.bin", b"\x00\x01")
    finally:
        os.umask(old)
    assert (tmp_path / "a.cu").stat().st_mode & 0o777 == mode
    assert (tmp_path / "sub" / "b.bin").stat().st_mode & 0o777 == mode


def test_replacing_a_file_keeps_its_mode(tmp_path):
    path = tmp_path / "kernel.cu"
    path.write_text("old")
    path.chmod(0o640)
    write_if_changed(path, "new")
    assert path.read_text() == "new" and path.stat().st_mode & 0o777 == 0o640


def test_write_if_changed_compares_bytes(tmp_path, monkeypatch):
    path = tmp_path / "out.cu"
    path.write_bytes(b"\xff\xfe\x00\x80 not text")  # an existing binary target
    write_if_changed(path, "// kernel\n")
    assert path.read_text() == "// kernel\n"
    writes = []
    monkeypatch.setattr(fcompile, "_atomic_write", lambda p, d: writes.append(p))
    write_if_changed(path, "// kernel\n")
    write_if_changed(path, b"// kernel\n")
    assert writes == []  # same bytes: not rewritten
    write_if_changed(path, b"\x00binary")
    assert writes == [path]


def test_flashmoe_cache_naming_a_file_is_a_typed_error(tmp_path, monkeypatch, gen):
    a_file = tmp_path / "not_a_dir"
    a_file.write_text("x")
    monkeypatch.setenv("FLASHMOE_CACHE", str(a_file))
    with pytest.raises(CacheError, match="FLASHMOE_CACHE=.*not_a_dir.* is not a directory") as e:
        compile_source(gen, ARCH)
    assert isinstance(e.value, FlashMoEError)
    assert a_file.read_text() == "x"


def test_an_unwritable_cache_is_a_typed_error(tmp_path, monkeypatch, gen, pristine):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    monkeypatch.setenv("FLASHMOE_CACHE", str(a_file / "below"))  # a file in the path
    fake_nvrtc(monkeypatch, pristine)
    with pytest.raises(CacheError, match="cannot write the kernel cache .*FLASHMOE_CACHE"):
        compile_source(gen, ARCH)


def test_exported_source_honours_the_umask_and_replaces_a_binary_file(tmp_path, gen):
    from flashmoe_gen.export import export_cu

    old = os.umask(0o027)
    try:
        export_cu(TINY, gen.config, str(tmp_path / "layer.cu"))
    finally:
        os.umask(old)
    assert (tmp_path / "layer.cu").stat().st_mode & 0o777 == 0o640
    binary = tmp_path / "old.cu"
    binary.write_bytes(os.urandom(64) + b"\xff\xfe")
    export_cu(TINY, gen.config, str(binary))  # no UnicodeDecodeError reading the old file
    assert binary.read_bytes() == (tmp_path / "layer.cu").read_bytes()
