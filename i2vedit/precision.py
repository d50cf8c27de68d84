"""Compute dtypes: which parts of a run may trade fp32 for bf16 / fp16, and how.

The authors (method.md §3, §5.5, §7) invert in fp32, denoise in an fp16 pipeline under autocast, and
train the LoRA with fp32 master weights under fp16 autocast. Here the model computes in fp32 whatever
its weights are stored in (the command line's ``--weights-dtype``: fp16 / bf16 storage, each layer's
weights cast to fp32 for its own forward, ``hosts.diffusers.host.store_weights``; so fp32 results on
weights rounded to the storage dtype), and two choices, each ``fp32`` (default), ``bf16`` or ``fp16``,
set a ``torch.autocast`` region around the UNet's calls:

- the denoising dtype: matched denoising, with its source replay and skip-interval K/V replays;
- the training dtype: the LoRA's forward and backward (its weights and AdamW state stay fp32).

Always fp32: the inversion (its UNet calls, latents and σ arithmetic), the VAE and CLIP encoders and
the VAE decoder, the sampler's updates, and the attention-matching scores, which leave any autocast
region (``outside_autocast``). ``fp32`` adds no region at all: results are the same bits as without one.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from typing import Literal, cast

import torch

from .errors import I2VEditError

log = logging.getLogger("i2vedit")

DtypeName = Literal["fp32", "bf16", "fp16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTOCAST_DEVICES = ("cuda", "cpu")


def check_dtype(name: str, what: str = "compute dtype") -> DtypeName:
    """``name`` if it is one of ``DTYPES``, else a clear error."""
    if name not in DTYPES:
        raise I2VEditError(f"the {what} must be one of {', '.join(DTYPES)}, got {name!r}.")
    return cast(DtypeName, name)


def autocast_dtype(name: str) -> torch.dtype | None:
    """The autocast dtype of a dtype name, None for fp32 (no autocast region)."""
    return None if check_dtype(name) == "fp32" else DTYPES[name]


def default_dtype(device: torch.device | str) -> DtypeName:
    """The command line's ``auto``: bf16 on a CUDA GPU that has it (fp32's range, so nothing overflows),
    fp16 on an older GPU (as the authors), fp32 elsewhere."""
    if torch.device(device).type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def resolve_dtypes(dtype: str, train_dtype: str, device: torch.device | str) -> tuple[DtypeName, DtypeName]:
    """The denoising and training dtypes of the command line's ``--dtype`` / ``--train-dtype``: ``auto`` is
    ``default_dtype`` of the device for denoising, and the denoising dtype for training."""
    denoise = default_dtype(device) if dtype == "auto" else check_dtype(dtype)
    return denoise, denoise if train_dtype == "auto" else check_dtype(train_dtype)


def resolve_weights_dtype(name: str, device: torch.device | str) -> DtypeName:
    """The storage dtype of the command line's ``--weights-dtype``: ``auto`` is fp16 on a CUDA GPU (half
    the memory; the layers still compute in fp32, so fp16's narrow range never holds an activation) and
    fp32 elsewhere (a CPU has the memory, and fp32 keeps the results of before the choice existed)."""
    if name == "auto":
        return "fp16" if torch.device(device).type == "cuda" else "fp32"
    return check_dtype(name, "weights dtype")


def check_stored_weights(stored: torch.dtype | None, name: DtypeName) -> None:
    """Refuse a run whose settings name another weights dtype (``EditSettings.weights_dtype``) than the one
    its host stores its weights in (``stored``; None: the host keeps them as its application loaded them,
    as ComfyUI's MODEL does). The name goes into the reuse folder's identity, and the model fingerprint
    cannot tell an fp16 copy of a checkpoint from its fp32 one: a wrong name would let a later run take
    inversions and LoRAs made from other weights."""
    if stored is None or stored == DTYPES[name]:
        return
    have = next((k for k, v in DTYPES.items() if v == stored), str(stored).removeprefix("torch."))
    raise I2VEditError(
        f"the settings say weights_dtype={name!r} but the model's weights are stored in {have}: set "
        f"weights_dtype={have!r} (the command line's --weights-dtype sets both)."
    )


def check_device(device: torch.device | str, name: str, what: str = "compute dtype") -> None:
    """Refuse a reduced dtype on a device torch cannot autocast; warn that it is slow on a CPU."""
    dev = torch.device(device)
    if check_dtype(name, what) == "fp32":
        return
    if dev.type not in AUTOCAST_DEVICES:
        raise I2VEditError(
            f"the {what} {name} needs torch autocast, which this pack uses on CUDA and CPU only; the model is on "
            f"{dev.type}. Use fp32."
        )
    if dev.type == "cpu":
        log.warning("%s %s on the CPU: it works, but is usually slower than fp32 there (it is meant for GPUs)",
                    what, name)  # fmt: skip


def autocast_region(device: torch.device | str, dtype: torch.dtype | None) -> AbstractContextManager[object]:
    """A ``torch.autocast`` region in ``dtype`` on ``device``'s type; nothing for None or fp32."""
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype)


def outside_autocast(device: torch.device) -> AbstractContextManager[object]:
    """Leave an enclosing autocast region (its matmuls then run in their inputs' dtype); nothing outside one."""
    if device.type in AUTOCAST_DEVICES and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()
