"""Peak extra memory of a piece of torch code, measured on any device, including ``meta``.

Benchmarks need "how much memory does this attention variant add at full size" on machines without
a GPU. ``track_allocations()`` is a ``TorchDispatchMode`` that sees every ATen op run inside it and
counts the bytes of the tensor storages those ops newly allocate, for as long as the storages stay
alive. On the ``meta`` device nothing is computed or allocated, yet the numbers are exact, so a
full-size SVD attention can be sized on a laptop::

    q = torch.empty(14, 5, 9216, 64, device="meta")
    with track_allocations() as mem:
        out = torch.softmax(q @ q.transpose(-1, -2), dim=-1) @ q
    mem.peak_bytes           # bytes alive at the worst moment (here two 14·5·9216² score tensors)
    mem.live_bytes_at_exit   # what was still alive when the block ended (here ``out``)

Rules: an op's output counts when its storage is new, i.e. not the storage of any input (views,
in-place and ``out=`` results, aliases are free) and not one already counted. Its size is the
storage's ``nbytes``. It stops counting when the storage is freed, which a view keeps from
happening: a weak reference on the storage object (PyTorch keeps that object alive exactly as long
as the storage, torch ≥ 2.1) tells us when. Storages are told apart by identity, never ``data_ptr``
(0 for every meta tensor). Tensors created before the block are never counted, even when freed in it.

Not seen: memory a kernel uses internally without returning it as a tensor (matmul packing buffers,
cuBLAS/cuDNN workspaces, the score tiles inside a fused SDPA/flash kernel), allocator overhead
(CUDA's caching, rounding to blocks, fragmentation), memory allocated by other threads (the mode is
thread-local) or outside torch ops (``torch.from_numpy``). Backend choice differs by device:
``scaled_dot_product_attention`` on meta runs the math path (full score tensors, counted) while on
CPU/CUDA a fused kernel keeps its tiles internal (only output and logsumexp counted). Objects kept
by reference cycles count until the garbage collector frees them. Works on CPU, meta and CUDA
tensors alike; ``device=`` restricts counting to one device type.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["AllocationTracker", "format_bytes", "measure", "track_allocations"]

# ``torch.tensor(data)`` builds the tensor below the dispatcher and hands it to this op, which returns
# it as is: the output aliases its input yet is a fresh allocation.
_LIFT_OPS = frozenset(
    op
    for name in ("lift_fresh", "lift_fresh_copy")
    if (op := getattr(torch.ops.aten, name, None)) is not None
)
_preservation_checked = False


def _check_storage_preservation() -> None:
    """Fail loudly on a torch whose storage objects do not live as long as the storage itself."""
    global _preservation_checked
    if _preservation_checked:
        return
    t = torch.empty(1, device="meta")
    probe = t.untyped_storage()
    view = t[:]
    fired: list[bool] = []
    weakref.finalize(probe, fired.append, True)
    del probe, t
    if fired or view.untyped_storage() is not view.untyped_storage():
        raise RuntimeError(
            "i2vedit.run.memtrack needs torch >= 2.1 (PyObject preservation for storages); this torch "
            f"{torch.__version__} frees a storage's Python object while the storage lives, so freed "
            "bytes cannot be tracked. Upgrade torch to measure memory."
        )
    _preservation_checked = True


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested, storage-less subclasses
        return None


def _key(storage: torch.UntypedStorage) -> int:
    # The StorageImpl's address: stable while the storage lives, distinct for meta storages too.
    return storage._cdata


def format_bytes(n: int) -> str:
    """``n`` bytes as a short human string in binary units (``'22.15 GiB'``)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


class AllocationTracker(TorchDispatchMode):
    """Counts storage bytes newly allocated by ops run inside it and still alive; records the peak.

    Attributes (read them during or after the block):

    - ``peak_bytes``: the most counted bytes alive at once.
    - ``live_bytes``: counted bytes alive now (keeps dropping after the block as tensors die).
    - ``live_bytes_at_exit``: ``live_bytes`` when the block last ended (``None`` before); non-zero
      means the block kept or leaked memory, e.g. its result.
    - ``allocations`` / ``allocated_bytes``: how many storages were counted and their total size.
    - ``peak_op``: name of the op whose outputs set the peak.
    """

    def __init__(self, device: str | torch.device | None = None) -> None:
        super().__init__()
        self.device_type = None if device is None else torch.device(device).type
        self.peak_bytes = 0
        self.live_bytes = 0
        self.live_bytes_at_exit: int | None = None
        self.allocations = 0
        self.allocated_bytes = 0
        self.peak_op: str | None = None
        self._live: dict[int, int] = {}  # storage key -> bytes counted for it
        # Re-entrant: a finalizer can fire (garbage collection) while this thread holds the lock.
        self._lock = threading.RLock()

    # -- context manager ---------------------------------------------------------------------------

    def __enter__(self) -> AllocationTracker:
        _check_storage_preservation()
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        with self._lock:
            self.live_bytes_at_exit = self.live_bytes

    def reset_peak(self) -> None:
        """Restart peak tracking from what is alive now (like ``torch.cuda.reset_peak_memory_stats``)."""
        with self._lock:
            self.peak_bytes = self.live_bytes
            self.peak_op = None

    def summary(self) -> str:
        exit_part = (
            "" if self.live_bytes_at_exit is None else f", {format_bytes(self.live_bytes_at_exit)} at exit"
        )
        return (
            f"peak {format_bytes(self.peak_bytes)} (at {self.peak_op}), live {format_bytes(self.live_bytes)}"
            f"{exit_part}, {self.allocations} allocations totalling {format_bytes(self.allocated_bytes)}"
        )

    # -- bookkeeping -------------------------------------------------------------------------------

    def _counts(self, t: torch.Tensor) -> bool:
        return self.device_type is None or t.device.type == self.device_type

    def _add(self, storage: torch.UntypedStorage, nbytes: int) -> None:
        key = _key(storage)
        self._live[key] = nbytes
        self.live_bytes += nbytes
        self.allocations += 1
        self.allocated_bytes += nbytes
        weakref.finalize(storage, self._free, key).atexit = False

    def _free(self, key: int) -> None:
        with self._lock:
            self.live_bytes -= self._live.pop(key, 0)

    def _grow(self, key: int, delta: int) -> None:
        self._live[key] += delta
        self.live_bytes += delta
        if delta > 0:
            self.allocated_bytes += delta

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _tensors((args, kwargs))
        before: dict[int, tuple[torch.UntypedStorage, int]] = {}
        for t in inputs:
            s = _storage(t)
            if s is not None:
                before[_key(s)] = (s, s.nbytes())

        out = func(*args, **kwargs)

        with self._lock:
            changed = False
            if func._schema.is_mutable:  # in-place / out= ops may resize a storage they write to
                for key, (s, nbytes) in before.items():
                    delta = s.nbytes() - nbytes
                    if delta == 0:
                        continue
                    if key in self._live:
                        self._grow(key, delta)
                        changed = True
                    elif delta > 0 and any(self._counts(t) for t in inputs if _storage(t) is s):
                        self._add(s, delta)  # a pre-existing storage grew: count the growth only
                        changed = True
            lifted = func.overloadpacket in _LIFT_OPS
            for t in _tensors(out):
                s = _storage(t)
                if s is None or not self._counts(t):
                    continue
                key = _key(s)
                if key in self._live or (key in before and not lifted):
                    continue
                nbytes = s.nbytes()
                if nbytes:
                    self._add(s, nbytes)
                    changed = True
            if changed and self.live_bytes > self.peak_bytes:
                self.peak_bytes = self.live_bytes
                self.peak_op = str(func)
        return out


def track_allocations(device: str | torch.device | None = None) -> AllocationTracker:
    """A fresh ``AllocationTracker``: ``with track_allocations() as mem: ...; mem.peak_bytes``.

    ``device`` (e.g. ``"cpu"``, ``"meta"``, ``"cuda"``) counts only storages on that device type;
    ``None`` counts all.
    """
    return AllocationTracker(device)


def measure(
    fn: Callable[..., Any], *args: Any, device: str | torch.device | None = None, **kwargs: Any
) -> tuple[Any, AllocationTracker]:
    """Run ``fn(*args, **kwargs)`` under a fresh tracker; returns ``(result, tracker)``.

    The result is alive at exit, so ``tracker.live_bytes_at_exit`` includes it.
    """
    with track_allocations(device) as mem:
        result = fn(*args, **kwargs)
    return result, mem
