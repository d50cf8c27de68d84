"""Small file helpers shared by the pipeline, training checkpoints and the command line."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import I2VEditError


def writable_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``path`` if needed and prove it can be written, before any computing starts."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".i2vedit-write-test.", dir=p)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise I2VEditError(f"cannot write to the {what} {p} ({e}); choose a folder you can write to.") from e
    return p


def looks_pickled(path: str | os.PathLike) -> bool:
    """True for a pickle or zip (``torch.save``) file, judged by its first bytes, without parsing it."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":  # safetensors: an 8-byte header length, then the JSON header
        return False
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def save_safetensors_atomic(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Write a safetensors file through a temporary file in the same folder: never a half-written file."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(suffix=".tmp", prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return target
