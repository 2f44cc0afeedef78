"""Runs the project's .metal kernels on the CPU: compile them as C++20 against a shim of
<metal_stdlib>, execute each threadgroup's threads as cooperative fibers.

    lib = MetalLibrary("metal/requantize.metal")
    res = lib.run("requantize_int4_b4_g64_sg32_float32_float32",
                  buffers={0: packed, 1: scales, 2: wq, 3: s, 4: b,
                           5: np.uint32(n_groups), 6: np.uint32(groups_per_row)},
                  grid=(n_tg, 1, 1), threadgroup=(256, 1, 1), schedule="reverse")
    res.bytes_read, res.bytes_written

See README.md next to this file for what this does and does not prove.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .lint import LintIssue, lint_preprocessed
from .translate import TranslateError, launch_glue, translate

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
SHIM_DIR = HERE / "shim"
RUNTIME_DIR = HERE / "runtime"
MAX_BUFFERS = 32
SCHEDULES = {"forward": 0, "reverse": 1, "random": 2}
PARAM_KINDS = {
    0: "device pointer",
    1: "constant pointer",
    2: "constant reference",
    3: "threadgroup argument",
    4: "builtin",
}

__all__ = [
    "MetalLibrary",
    "MetalEmulatorError",
    "MetalCompileError",
    "MetalLintError",
    "LaunchResult",
    "clang_available",
    "lint_file",
]


class MetalEmulatorError(RuntimeError):
    """A kernel failed at run time: out-of-bounds access, barrier misuse, divergent
    collectives, threadgroup memory over the limit, or bad arguments."""


class MetalCompileError(MetalEmulatorError):
    """The .metal source could not be preprocessed, translated or compiled."""


class MetalLintError(MetalCompileError):
    """The source uses C++ that Metal rejects (double, std::, recursion, ...)."""

    def __init__(self, issues: list[LintIssue]):
        self.issues = issues
        super().__init__("Metal lint failed:\n" + "\n".join(str(i) for i in issues))


class _Buffer(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("size", ctypes.c_ulonglong),
        ("present", ctypes.c_int),
        ("writable", ctypes.c_int),
    ]


_U64S = ctypes.c_ulonglong * MAX_BUFFERS


class _Launch(ctypes.Structure):
    _fields_ = [
        ("buffers", _Buffer * MAX_BUFFERS),
        ("tg_arg_bytes", _U64S),
        ("grid", ctypes.c_uint * 3),
        ("threadgroup", ctypes.c_uint * 3),
        ("schedule", ctypes.c_int),
        ("seed", ctypes.c_ulonglong),
        ("count_unique", ctypes.c_int),
        ("bytes_read", _U64S),
        ("bytes_written", _U64S),
        ("unique_read", _U64S),
        ("unique_written", _U64S),
        ("tg_mem_used", ctypes.c_ulonglong),
        ("error", ctypes.c_char * 2048),
    ]


class _Param(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int),
        ("index", ctypes.c_int),
        ("elem_size", ctypes.c_int),
        ("writable", ctypes.c_int),
    ]


@dataclass
class KernelParam:
    kind: str
    index: int
    elem_size: int
    writable: bool


@dataclass
class LaunchResult:
    """Device-memory traffic of one launch. bytes_* count every access a thread makes
    (what the kernel issues); unique_bytes_* count distinct bytes touched (what a
    perfect cache would move; only with count_unique=True, else None)."""

    bytes_read: int
    bytes_written: int
    per_buffer: dict[int, tuple[int, int]] = field(default_factory=dict)
    unique_bytes_read: int | None = None
    unique_bytes_written: int | None = None
    unique_per_buffer: dict[int, tuple[int, int]] | None = None
    threadgroup_memory: int = 0


def _which(names):
    for n in names:
        p = shutil.which(n)
        if p:
            return p
    return None


def _clang_major(cxx: str) -> int:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"clang version (\d+)", out)
    return int(m.group(1)) if m else 0


def default_compiler(strict: bool = False) -> str | None:
    if strict:
        # clang >= 15: older versions have no _Float16 (our `half`) on x86-64.
        for name in [
            "clang++-20",
            "clang++-19",
            "clang++-18",
            "clang++-17",
            "clang++-16",
            "clang++-15",
            "clang++",
        ]:
            p = shutil.which(name)
            if p and _clang_major(p) >= 15:
                return p
        return None
    return os.environ.get("MOEQUANT_EMU_CXX") or _which(["g++", "clang++", "c++"])


def clang_available() -> bool:
    return default_compiler(strict=True) is not None


def cache_dir() -> Path:
    d = os.environ.get("MOEQUANT_EMU_CACHE") or Path.home() / ".cache" / "moequant-metal-emu"
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    return d


def _resolve(path) -> Path:
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        p = REPO_ROOT / p
    if not p.exists():
        raise FileNotFoundError(f"no Metal source {path}")
    return p.resolve()


def _run(cmd, what):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise MetalCompileError(f"{what} failed ({' '.join(map(str, cmd[:1]))}):\n{r.stderr[-8000:]}")
    return r.stdout


def _build(root: Path, target: Path, cmd: list, what: str):
    """Runs cmd with `-o tmp`, then renames: parallel test workers may race on the cache."""
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        out = Path(tmp) / target.name
        _run([*cmd, "-o", str(out)], what)
        os.replace(out, target)


def preprocess(src: Path, cxx: str, include_dirs=(), defines=()) -> str:
    """The prepass: macros and includes resolved, address spaces as marker tokens.
    -nostdinc: a kernel cannot include host headers, only the shim and its own."""
    cmd = [
        cxx,
        "-E",
        "-x",
        "c++",
        "-std=c++20",
        "-nostdinc",
        "-nostdinc++",
        "-DMSL_SHIM_PREPASS",
        "-D__METAL_VERSION__=310",
        f"-I{SHIM_DIR}",
        f"-I{src.parent}",
    ]
    cmd += [f"-I{d}" for d in include_dirs] + [f"-D{d}" for d in defines] + [str(src)]
    return _run(cmd, "preprocessing")


def lint_file(path, include_dirs=(), defines=()) -> list[LintIssue]:
    """Metal-only language rules on a .metal file and everything it includes."""
    src = _resolve(path)
    return lint_preprocessed(preprocess(src, default_compiler(), include_dirs, defines))


def _compiler_id(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout


def generate_source(path, cxx: str, *, include_dirs=(), defines=(), lint=True, only=None) -> str:
    """The C++ translation unit for a .metal file: shim, translated kernels, launchers
    (`msl_kernel_count/name/params/launch`). Compile it with kernel_flags() and link
    runtime/msl_runtime.cpp."""
    pre = preprocess(_resolve(path), cxx, include_dirs, defines)
    if lint:
        issues = lint_preprocessed(pre)
        if issues:
            raise MetalLintError(issues)
    try:
        tr = translate(pre, only)
    except TranslateError as e:
        raise MetalCompileError(f"translation failed: {e}") from None
    return f'#include "{SHIM_DIR / "metal_stdlib"}"\n{tr.cpp}\n{launch_glue(tr)}\n'


def kernel_flags(cxx: str) -> list[str]:
    """Flags every kernel translation unit needs, whatever the target."""
    flags = ["-fno-strict-aliasing", "-ffp-contract=off", "-w"]
    if "clang" not in Path(cxx).name:
        flags.append("-fsingle-precision-constant")  # unsuffixed literals are float in MSL
    return flags


class MetalLibrary:
    """A .metal file compiled for the emulator; `kernels` lists its host names.

    strict: compile with clang++ and threadgroup pointers in their own address space.
    only: compile just these host names (faster, for focused tests).
    cache: directory for the compiled library (default: cache_dir()).
    opt: optimisation flag; -Og builds the 486 requantize kernels 3x faster than -O1.
    context_switch: "asm" (x86-64) or "ucontext" (portable fallback).
    div_ulps: inexact-division mode: divide() (metal::, fast::, precise::) returns the
    correctly rounded quotient off by a pseudo-random 0..div_ulps ulps either way."""

    def __init__(
        self,
        path,
        *,
        include_dirs=(),
        defines=(),
        strict: bool = False,
        lint: bool = True,
        compiler: str | None = None,
        context_switch: str = "asm",
        only=None,
        cache=None,
        opt: str = "-Og",
        div_ulps: int = 0,
    ):
        self.path = _resolve(path)
        cxx = compiler or default_compiler(strict)
        if cxx is None:
            raise MetalCompileError("no C++ compiler found (strict mode needs clang++ >= 15)")
        source = generate_source(
            self.path, cxx, include_dirs=include_dirs, defines=defines, lint=lint, only=only
        )
        flags = ["-std=c++20", opt, "-fPIC", "-shared", "-fvisibility=hidden", *kernel_flags(cxx)]
        if strict:
            flags.append("-DMSL_STRICT")
        if div_ulps:
            flags.append(f"-DMSL_DIV_ULPS={int(div_ulps)}")
        rt_flags = ["-std=c++20", "-O1", "-fPIC", "-fvisibility=hidden", "-c"]
        if context_switch == "ucontext":
            rt_flags.append("-DMSL_USE_UCONTEXT")
        cid = _compiler_id(cxx)
        rt_hash = hashlib.sha256(" ".join(rt_flags + [cid]).encode())
        for f in sorted(RUNTIME_DIR.iterdir()):
            rt_hash.update(f.read_bytes())
        # The translated source holds the kernel file and its includes; the shim is
        # included by path, so its content is hashed here.
        h = hashlib.sha256(rt_hash.digest())
        for part in [source, " ".join(flags)]:
            h.update(part.encode())
        for f in sorted(SHIM_DIR.iterdir()):
            h.update(f.read_bytes())
        root = Path(cache or cache_dir())
        so = root / f"{self.path.stem}-{h.hexdigest()[:20]}.so"
        if not so.exists():
            # The runtime is the same for every kernel file: built once per cache.
            rt_obj = cache_dir() / f"msl_runtime-{rt_hash.hexdigest()[:20]}.o"
            if not rt_obj.exists():
                _build(
                    rt_obj.parent,
                    rt_obj,
                    [cxx, *rt_flags, str(RUNTIME_DIR / "msl_runtime.cpp")],
                    "compiling the emulator runtime",
                )
            with tempfile.TemporaryDirectory(dir=root) as tmp:
                cpp = Path(tmp) / (self.path.stem + ".emu.cpp")
                cpp.write_text(source)
                _build(root, so, [cxx, *flags, str(cpp), str(rt_obj)], f"compiling {self.path.name}")
        self._lib = ctypes.CDLL(str(so))
        self._lib.msl_kernel_name.restype = ctypes.c_char_p
        self.so_path = so
        self.kernels = [self._lib.msl_kernel_name(i).decode() for i in range(self._lib.msl_kernel_count())]
        self._index = {k: i for i, k in enumerate(self.kernels)}

    def params(self, name: str) -> list[KernelParam]:
        arr = (_Param * 64)()
        n = self._lib.msl_kernel_params(self._kernel(name), arr)
        return [KernelParam(PARAM_KINDS[p.kind], p.index, p.elem_size, bool(p.writable)) for p in arr[:n]]

    def _kernel(self, name: str) -> int:
        if name not in self._index:
            raise KeyError(f"no kernel {name!r} in {self.path.name}")
        return self._index[name]

    def run(
        self,
        name: str,
        buffers: dict,
        grid=(1, 1, 1),
        threadgroup=(1, 1, 1),
        *,
        schedule: str = "forward",
        seed: int = 0,
        threadgroup_memory: dict | None = None,
        count_unique: bool = False,
    ) -> LaunchResult:
        """Dispatches `grid` threadgroups of `threadgroup` threads. buffers maps a
        [[buffer(n)]] index to a C-contiguous numpy array (device memory, written in
        place) or a numpy scalar (bound to `constant T&`)."""
        k = self._kernel(name)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}")
        desc = _Launch()
        keep = []
        for idx, buf in buffers.items():
            if not 0 <= idx < MAX_BUFFERS:
                raise ValueError(f"buffer index {idx} out of range")
            if isinstance(buf, np.ndarray):
                if not buf.flags.c_contiguous:
                    raise ValueError(f"buffer({idx}) must be C-contiguous")
                arr, writable = buf, buf.flags.writeable
            elif isinstance(buf, np.generic):
                arr, writable = np.array(buf), False
            else:
                raise TypeError(
                    f"buffer({idx}): pass a numpy array or a numpy scalar such "
                    f"as np.uint32(7), not {type(buf).__name__}"
                )
            keep.append(arr)
            b = desc.buffers[idx]
            b.data, b.size, b.present, b.writable = arr.ctypes.data, arr.nbytes, 1, int(writable)
        for p in self.params(name):
            if p.kind == "builtin":
                continue
            if p.kind == "threadgroup argument":
                size = (threadgroup_memory or {}).get(p.index)
                if size is None:
                    raise MetalEmulatorError(
                        f"{name}: [[threadgroup({p.index})]] needs threadgroup_memory={{{p.index}: nbytes}}"
                    )
                desc.tg_arg_bytes[p.index] = size
                continue
            if p.index not in buffers:
                raise MetalEmulatorError(f"{name}: buffer({p.index}) ({p.kind}) is not bound")
            nbytes = keep[list(buffers).index(p.index)].nbytes
            if p.kind == "constant reference" and nbytes != p.elem_size:
                raise MetalEmulatorError(
                    f"{name}: buffer({p.index}) binds a constant reference of "
                    f"{p.elem_size} bytes but {nbytes} bytes were given"
                )
        desc.grid[:] = [int(x) for x in _dims(grid)]
        desc.threadgroup[:] = [int(x) for x in _dims(threadgroup)]
        desc.schedule = SCHEDULES[schedule]
        desc.seed = seed
        desc.count_unique = int(count_unique)
        rc = self._lib.msl_kernel_launch(k, ctypes.byref(desc))
        if rc != 0:
            raise MetalEmulatorError(f"{name}: {desc.error.decode(errors='replace')}")
        per = {
            i: (desc.bytes_read[i], desc.bytes_written[i])
            for i in buffers
            if isinstance(buffers[i], np.ndarray)
        }
        res = LaunchResult(
            sum(r for r, _ in per.values()),
            sum(w for _, w in per.values()),
            per,
            threadgroup_memory=desc.tg_mem_used,
        )
        if count_unique:
            res.unique_per_buffer = {i: (desc.unique_read[i], desc.unique_written[i]) for i in per}
            res.unique_bytes_read = sum(r for r, _ in res.unique_per_buffer.values())
            res.unique_bytes_written = sum(w for _, w in res.unique_per_buffer.values())
        return res


def _dims(d):
    d = tuple(d)
    if not 1 <= len(d) <= 3:
        raise ValueError("grid and threadgroup take 1 to 3 dimensions")
    return d + (1,) * (3 - len(d))
