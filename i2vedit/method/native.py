"""The fused CPU kernel of spatial attention matching (``match_kernel.c``), built on first use.

On an x86-64 CPU with AVX2 and FMA, and a C compiler on the path, ``spatial_match`` hands each
layer to the C kernel, which keeps every map in the cache instead of writing it out block by block
(about 40 % of the time of torch's blocks at 9216 tokens; ``bench attention`` prints both). The
library is compiled once per source and compiler into the user's cache folder and loaded with
ctypes; without a compiler, on another CPU, or with ``I2VEDIT_NATIVE=0`` everything runs on torch's
path, with results equal within fp32 rounding.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import I2VEditError

SOURCE = Path(__file__).with_name("match_kernel.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-shared", "-fPIC", "-std=c99")
ENV_SWITCH = "I2VEDIT_NATIVE"

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_refusal() -> str | None:
    """Why this CPU cannot run the kernel (None: it can)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernel needs an x86-64 CPU (this is {platform.machine() or 'unknown'})"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "cannot tell whether this CPU has AVX2 and FMA (no /proc/cpuinfo)"
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return None if "avx2" in flags and "fma" in flags else "this CPU lacks AVX2 or FMA"


def _cache_dir() -> Path:
    if os.environ.get("I2VEDIT_CACHE"):
        return Path(os.environ["I2VEDIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "i2vedit"


def _build(compiler: str) -> Path:
    """Compile the kernel into the cache (once per source, flags and compiler); returns the library path."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + repr(FLAGS).encode() + version.encode()).hexdigest()[:16]
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / "i2vedit"):
        lib = folder / f"match_kernel-{key}.so"
        if lib.exists():
            return lib
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
            os.close(fd)
        except OSError:
            continue
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if done.returncode:
            os.unlink(tmp)
            raise RuntimeError(done.stderr.strip()[-2000:])
        os.replace(tmp, lib)  # atomic: a process that races us loads a whole file or builds its own
        return lib
    raise RuntimeError("no writable cache folder for the compiled kernel")


def kernel() -> ctypes.CDLL | None:
    """The loaded kernel, or None where it cannot run here (``unavailable_reason`` says why)."""
    if "lib" in _state:  # once decided, read without the lock: every matched layer asks
        return _state["lib"]  # type: ignore[return-value]
    with _lock:
        if "lib" in _state:
            return _state["lib"]  # type: ignore[return-value]
        lib, reason = None, None
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if os.environ.get(ENV_SWITCH, "1") == "0":
            reason = f"turned off ({ENV_SWITCH}=0)"
        elif (refusal := _cpu_refusal()) is not None:
            reason = refusal
        elif compiler is None:
            reason = "no C compiler on the path (cc, gcc or $CC)"
        else:
            try:
                lib = ctypes.CDLL(str(_build(compiler)))
                fn = lib.i2v_match_tiles
                fn.restype = ctypes.c_int
                fn.argtypes = (
                    [ctypes.c_void_p] * 9 + [ctypes.c_long] * 3 + [ctypes.c_float] + [ctypes.c_long] * 2
                )
                lib.i2v_match_tile_rows.restype = ctypes.c_long
                lib.i2v_match_tile_rows.argtypes = []
            except (OSError, RuntimeError, AttributeError) as e:
                lib, reason = None, f"the kernel did not build or load: {e}"
        _state["reason"] = reason
        _state["lib"] = lib  # last: a reader without the lock that sees it also sees the reason
        return lib


def unavailable_reason() -> str | None:
    """Why the kernel does not run here (None: it does)."""
    kernel()
    return _state["reason"]  # type: ignore[return-value]


def _pool(workers: int) -> ThreadPoolExecutor:
    with _lock:
        pool = _state.get("pool")
        if pool is None or _state.get("workers") != workers:
            if pool is not None:
                pool.shutdown(wait=False)  # type: ignore[attr-defined]
            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="i2vedit-match")
            _state["pool"], _state["workers"] = pool, workers
        return pool  # type: ignore[return-value]


def fits(q: torch.Tensor, k: torch.Tensor, heads: int) -> bool:
    """Whether a layer's (rows, tokens, heads·d) inputs can go to the kernel (CPU, self-attention: keys
    as many as queries, token count and head width in its vector steps, no gradient wanted)."""
    _, tokens, width = q.shape
    return (
        q.device.type == "cpu"
        and k.shape == q.shape
        and tokens % 8 == 0
        and width % heads == 0
        and (width // heads) % 16 == 0
        and not (torch.is_grad_enabled() and q.requires_grad)
    )


def spatial_match_native(
    qe: torch.Tensor,
    ke: torch.Tensor,
    ve: torch.Tensor,
    qs: torch.Tensor,
    ks: torch.Tensor,
    tau: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``attention.spatial_match`` on heads-split inputs (frames, heads, tokens, d) by the C kernel.

    The caller checks ``kernel()`` and ``fits``. Returns (out (frames, heads, tokens, d) in v's dtype,
    D, M (frames, tokens) fp32).
    """
    lib = kernel()
    assert lib is not None
    frames, heads, tokens, d = qe.shape
    if tau.numel() != frames:
        raise I2VEditError(f"spatial matching needs one threshold per frame: {frames}, got {tau.numel()}.")
    q_e, v_e, q_s = (t.float().contiguous() for t in (qe, ve, qs))
    kp_e, kp_s = (t.float().unflatten(2, (-1, 8)).transpose(-1, -2).contiguous() for t in (ke, ks))
    tau = tau.to("cpu", torch.float32).contiguous()
    out = torch.empty_like(v_e)
    diff = torch.empty(frames, tokens)
    weight = torch.empty(frames, tokens)
    tiles = frames * math.ceil(tokens / lib.i2v_match_tile_rows())
    workers = max(1, min(torch.get_num_threads(), tiles))
    bounds = [tiles * i // workers for i in range(workers + 1)]
    ptrs = [t.data_ptr() for t in (q_e, kp_e, v_e, q_s, kp_s, tau, out, diff, weight)]
    scale = 1.0 / math.sqrt(d)

    def run(i: int) -> int:
        return lib.i2v_match_tiles(*ptrs, heads, tokens, d, scale, bounds[i], bounds[i + 1])

    codes = [run(0)] if workers == 1 else list(_pool(workers).map(run, range(workers)))
    if any(codes):
        raise MemoryError("the matching kernel could not allocate its tile buffers")
    return out.to(ve.dtype), diff, weight
