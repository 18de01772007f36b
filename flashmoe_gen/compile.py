"""NVRTC compilation with a disk cache, a GPU-free compile-only path and a resource report.

One path serves both uses: NVRTC (the library CuPy uses, through ``cupy.cuda.nvrtc``)
compiles the generated source to a cubin for an explicit ``sm_XX`` target, the cubin and
its metadata are cached on disk, and ``load`` hands the cubin to ``cupy.RawModule`` on a
GPU machine. Name expressions resolve templated kernels to their lowered (mangled) names.

The cache trusts nothing it reads: an entry's metadata records the cubin's size and sha256,
and a missing, unreadable, truncated or foreign metadata file or a cubin that does not match
it is a miss, rebuilt and replaced atomically (temp file + ``os.replace``). Files get the
mode the umask gives (0666 & ~umask), as ``open()`` would, not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

from .errors import CacheError, CompileError, DeviceError
from .paths import CACHE_ENV, kernel_cache_root
from .render import GeneratedSource


@dataclass(frozen=True)
class KernelResources:
    """What ptxas reported for one kernel."""

    registers: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int
    static_smem: int = 0
    #: ptxas's "Potential Performance Loss" for this kernel's wgmma ("C7514: non wgmma
    #: instructions reading ..."), or "": serialised warpgroup MMAs run one at a time
    wgmma_serialized: str = ""

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


@dataclass
class CompiledModule:
    name: str
    arch: str
    cubin_path: str
    lowered: dict[str, str]                    # our kernel name -> symbol in the cubin
    resources: dict[str, KernelResources]      # our kernel name -> ptxas report
    dynamic_smem: dict[str, int] = field(default_factory=dict)
    log: str = ""
    options: tuple[str, ...] = ()
    nvrtc_version: str = ""
    cache_hit: bool = False
    cubin: bytes = b""                         # in memory when compiled with use_cache=False


def nvrtc_version() -> str:
    from cupy.cuda import nvrtc
    major, minor = nvrtc.getVersion()
    return f"{major}.{minor}"


@cache
def cuda_include_dirs() -> tuple[str, ...]:
    """Directories holding ``cuda_bf16.h`` and friends: a system toolkit or pip's headers."""
    candidates = []
    if os.environ.get("FLASHMOE_CUDA_INCLUDE"):
        candidates.append(os.environ["FLASHMOE_CUDA_INCLUDE"])
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "include"))
    candidates.append("/usr/local/cuda/include")
    for sp in sys.path:  # pip's nvidia-cuda-runtime / -crt / -cccl headers
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include"):
            candidates.append(os.path.join(sp, sub))
    for c in candidates:
        if os.path.isfile(os.path.join(c, "cuda_bf16.h")):
            dirs = [c]
            if os.path.isdir(os.path.join(c, "cccl")):
                dirs.append(os.path.join(c, "cccl"))
            return tuple(dirs)
    raise CompileError("no CUDA headers found (cuda_bf16.h)",
                       "install nvidia-cuda-runtime, nvidia-cuda-crt and nvidia-cuda-cccl "
                       "(pip), or set FLASHMOE_CUDA_INCLUDE / CUDA_PATH", None)


def compile_options(arch: str) -> tuple[str, ...]:
    opts = [f"--gpu-architecture={arch}", "-std=c++17", "--ptxas-options=-v", "-lineinfo"]
    opts += [f"-I{d}" for d in cuda_include_dirs()]
    return tuple(opts)


def cache_root() -> Path:
    """The compiled-kernel cache (``flashmoe_gen.paths.kernel_cache_root``)."""
    base = os.environ.get(CACHE_ENV)
    if base and os.path.exists(base) and not os.path.isdir(base):
        raise CacheError(f"{CACHE_ENV}={base!r} is not a directory: point it at a directory "
                         "(created if missing) or unset it to use the user cache")
    return kernel_cache_root()


_ENTRY_RE = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_STACK_RE = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS_RE = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
_SERIAL_RE = re.compile(r"\((C\d+)\) Potential Performance Loss: wgmma\.mma_async instructions "
                        r"are serialized due to (.+?) in the function '([^']+)'")


def parse_ptxas_log(log: str) -> dict[str, KernelResources]:
    """Per mangled kernel name: registers, stack, spills, static smem and whether its wgmma
    were serialised, from ``ptxas -v`` (that note precedes the function's own lines)."""
    serial = {m.group(3): f"{m.group(1)}: {' '.join(m.group(2).split())}"
              for m in _SERIAL_RE.finditer(log)}
    out: dict[str, KernelResources] = {}
    current, stack = None, (0, 0, 0)
    for line in log.splitlines():
        if m := _ENTRY_RE.search(line):
            current, stack = m.group(1), (0, 0, 0)
        elif (m := _STACK_RE.search(line)) and current:
            stack = tuple(int(v) for v in m.groups())
        elif (m := _REGS_RE.search(line)) and current:
            out[current] = KernelResources(int(m.group(1)), *stack, int(m.group(2) or 0),
                                           serial.get(current, ""))
            current = None
    return out


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask sets it, racing other threads)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` at once: readers see the old or the new file, never
    a part. Keeps the mode of the file it replaces; a new file gets 0666 & ~umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = os.stat(path)
        mode = stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else None
    except OSError:
        mode = None
    if mode is None:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_if_changed(path: Path, text: str | bytes) -> None:
    """Write only when the bytes differ, so tools watching mtimes see real changes only."""
    data = text.encode() if isinstance(text, str) else bytes(text)
    try:
        if path.read_bytes() == data:
            return
    except OSError:  # missing (or unreadable): write it
        pass
    _atomic_write(path, data)


def _cached(gen: GeneratedSource, arch: str, options: tuple[str, ...], version: str,
            cubin_path: Path, meta_path: Path) -> CompiledModule | None:
    """The cache entry, if its metadata parses and its cubin has the recorded size and
    sha256; None (a miss) for anything else."""
    try:
        meta = json.loads(meta_path.read_bytes())
        cubin = cubin_path.read_bytes()
        if (meta["cubin_size"] != len(cubin)
                or meta["cubin_sha256"] != hashlib.sha256(cubin).hexdigest()):
            return None
        return CompiledModule(
            name=gen.name, arch=arch, cubin_path=str(cubin_path), lowered=dict(meta["lowered"]),
            resources={k: KernelResources(**v) for k, v in meta["resources"].items()},
            dynamic_smem=dict(meta["dynamic_smem"]), log=str(meta["log"]), options=options,
            nvrtc_version=version, cache_hit=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # missing, unreadable, truncated or foreign: rebuild


def _store(root: Path, stem: str, gen: GeneratedSource, cubin: bytes, meta: dict) -> None:
    """Write the entry: the cubin first, then the metadata that vouches for it."""
    meta = {**meta, "cubin_size": len(cubin), "cubin_sha256": hashlib.sha256(cubin).hexdigest()}
    try:
        _atomic_write(root / f"{stem}.cubin", cubin)
        write_if_changed(root / f"{stem}.cu", gen.code)
        _atomic_write(root / f"{stem}.json", json.dumps(meta, indent=1).encode())
    except OSError as e:
        raise CacheError(f"cannot write the kernel cache in {root}: {e}; set {CACHE_ENV} to "
                         "a writable directory") from e


def target_arch(config, arch: str) -> str:
    """The NVRTC target for ``config`` on ``arch`` (wgmma needs the "a" variant)."""
    if config.uses_wgmma and not arch.endswith("a"):
        return arch + "a"
    return arch


def compile_source(gen: GeneratedSource, arch: str = "sm_90", *, use_cache: bool = True,
                   cache_dir: Path | None = None) -> CompiledModule:
    """Compile with NVRTC (no GPU needed); cached by source, options, NVRTC version, arch.

    A config with wgmma tiles is built for the arch-specific target (sm_90 -> sm_90a):
    warpgroup MMA exists only there.
    """
    from cupy.cuda import nvrtc

    arch = target_arch(gen.config, arch)
    options = compile_options(arch)
    version = nvrtc_version()
    key = hashlib.sha256("\0".join([gen.code, *options, version, arch]).encode()).hexdigest()[:20]
    root = (cache_dir or cache_root()) / arch
    stem = f"{gen.device_name}-{key}"  # no token count: one entry serves a whole family
    cubin_path, meta_path = root / f"{stem}.cubin", root / f"{stem}.json"
    kernels = gen.kernels.all()
    if use_cache and (hit := _cached(gen, arch, tuple(options), version, cubin_path,
                                     meta_path)) is not None:
        return hit

    prog = nvrtc.createProgram(gen.code, f"{gen.device_name}.cu", [], [])
    try:
        for expr in gen.kernels.name_expressions:
            nvrtc.addNameExpression(prog, expr)
        try:
            nvrtc.compileProgram(prog, list(options))
        except nvrtc.NVRTCError as e:
            log = nvrtc.getProgramLog(prog)
            # Keep the failing source for the user to read; outside the cache if asked to.
            src_path = (root if use_cache else Path(tempfile.gettempdir())) / f"{stem}.failed.cu"
            write_if_changed(src_path, gen.code)
            raise CompileError(f"NVRTC failed for {arch}: {e}", log, gen.config.name,
                               gen.problem.name, str(src_path)) from None
        log = nvrtc.getProgramLog(prog)
        lowered = {k: k for k in kernels if k not in gen.kernels.name_expressions}
        for expr in gen.kernels.name_expressions:
            lowered[expr] = nvrtc.getLoweredName(prog, expr)
        cubin = nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)

    by_symbol = parse_ptxas_log(log)
    resources = {k: by_symbol[sym] for k, sym in lowered.items() if sym in by_symbol}
    dynamic_smem = {gen.kernels.gate_up: gen.config.gate_up.smem_bytes(2),
                    gen.kernels.down: gen.config.down.smem_bytes(1)}
    if gen.kernels.persistent:
        dynamic_smem[gen.kernels.persistent] = gen.config.persistent_smem()
    mod = CompiledModule(name=gen.name, arch=arch, cubin_path=str(cubin_path), lowered=lowered,
                         resources=resources, dynamic_smem=dynamic_smem, log=log,
                         options=tuple(options), nvrtc_version=version)
    if use_cache:
        _store(root, stem, gen, bytes(cubin),
               {"lowered": lowered, "resources": {k: asdict(v) for k, v in resources.items()},
                "dynamic_smem": dynamic_smem, "log": log, "problem": gen.problem.to_dict(),
                "config": gen.config.to_dict(), "nvrtc": version, "options": list(options)})
    else:
        mod.cubin_path = ""
        mod.cubin = bytes(cubin)
    return mod


class LoadedModule:
    """A compiled module loaded on the current GPU: kernels ready to launch."""

    def __init__(self, compiled: CompiledModule):
        if not compiled.cubin_path:
            raise DeviceError(f"{compiled.name} was compiled with use_cache=False: CuPy loads "
                              "cubins from disk, compile with the cache to load it")
        try:
            import cupy
            self._raw = cupy.RawModule(path=compiled.cubin_path)
            self.functions = {k: self._raw.get_function(sym)
                              for k, sym in compiled.lowered.items()}
        except Exception as e:
            raise DeviceError(
                f"cannot load {compiled.name} ({compiled.arch}) on this GPU: {e}") from e
        # Every kernel opts in to its dynamic shared memory: the 48 KB allowed without it
        # count the static bytes too (on 2 x H200 the persistent kernel with exactly 48 KB
        # dynamic and 2 KB static fit no SM until it opted in).
        for k, nbytes in compiled.dynamic_smem.items():
            if nbytes > 0:
                self.functions[k].max_dynamic_shared_size_bytes = nbytes
        self.compiled = compiled

    def __getitem__(self, kernel: str):
        return self.functions[kernel]
