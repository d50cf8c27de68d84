"""What the nodes share: the category, socket types, the objects they carry, folders, progress.

Nodes stay thin: they validate what ComfyUI hands them, call ``i2vedit`` and wrap the result.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..i2vedit.errors import I2VEditError
from ..i2vedit.hosts.comfy.host import ComfySVDHost
from ..i2vedit.io.frames import ResizePlan, nonfinite_frames
from ..i2vedit.lora.file import check_lora_name
from ..i2vedit.method.inversion import Inversion
from ..i2vedit.method.matching import MatchedClip, MatchedResult
from ..i2vedit.method.skip_interval import SkipInterval

CATEGORY = "I2VEdit"

Inversions = io.Custom("I2V_INVERSION")
MotionLoRA = io.Custom("I2V_LORA")
KVCache = io.Custom("I2V_KV")
EditedClip = io.Custom("I2V_EDIT")
ResizeInfo = io.Custom("I2V_RESIZE")

LORA_FOLDER = "i2vedit_motion_loras"
INVERSION_FOLDER = "i2vedit_inversions"
MEMORY_TOOLTIP = (
    "recompute (default): keep only latent trajectories (a few MB per clip) and re-run the source's "
    "model call when its attention is needed, about 1.8× the time of a plain step. cache: keep every "
    "step's attention in RAM (tens of GB at 576×1024), about 1.3× a plain step. Same result either way."
)
SEED_TOOLTIP = "Seed of every random draw of this stage: the same inputs and seed give the same video."
CLIP_INDEX_TOOLTIP = (
    "Which clip of the video this is (0 = the first). Only used to derive this stage's seeds, so a graph "
    "of single-stage nodes reproduces the all-in-one node clip by clip."
)


def register_folders() -> None:
    """Motion LoRAs live in ``models/loras/i2vedit`` (so stock LoRA loaders list them too)."""
    loras = folder_paths.get_folder_paths("loras")
    base = loras[0] if loras else os.path.join(folder_paths.models_dir, "loras")
    folder_paths.add_model_folder_path(LORA_FOLDER, os.path.join(base, "i2vedit"))
    folder_paths.add_model_folder_path(
        INVERSION_FOLDER, os.path.join(folder_paths.models_dir, "i2vedit_inversions")
    )
    for name in (LORA_FOLDER, INVERSION_FOLDER):
        folder_paths.folder_names_and_paths[name][1].add(".safetensors")


def folder(name: str) -> str:
    """The first (writable) path of a registered folder, created if missing."""
    path = folder_paths.get_folder_paths(name)[0]
    os.makedirs(path, exist_ok=True)
    return path


# Saves write ``.<name>.XXXXXXXX.tmp`` next to the file first (``lora.file.save_lora``, ``io.files``): keep room.
TEMP_NAME_ROOM = 16


def name_limit(base: str) -> int:
    """The longest file name (in bytes) a save into folder ``base`` can use, temp file included."""
    try:
        name_max = int(os.pathconf(base, "PC_NAME_MAX"))
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows) or no answer: the common limit
        name_max = 255
    return max(name_max, 32) - TEMP_NAME_ROOM


def short(name: str, keep: int = 40) -> str:
    """``name`` for a message: long names shortened with an ellipsis."""
    return name if len(name) <= keep else name[:keep] + "…"


def fit_name(stem: str, tail: str, limit: int) -> str:
    """``stem + tail``, the stem cut (at a character boundary) so the name fits ``limit`` bytes."""
    raw, room = os.fsencode(stem), max(limit - len(os.fsencode(tail)), 1)
    cut = raw[:room].decode("utf-8", "ignore") if len(raw) > room else stem
    return (cut or "lora") + tail


def target_path(folder_name: str, name: str, overwrite: bool, what: str = "file name") -> str:
    """A file path in a registered folder for a user-given name, checked so that saving there will work.

    Refuses separators and other bad characters, names too long for the file system (before any
    computing: a long training must not end in "file name too long"), a folder that refuses the
    temporary file a save writes first, and clobbering an existing file (or link) unless ``overwrite``.
    """
    file = check_lora_name(name, what)
    base = folder(folder_name)
    size, limit = len(os.fsencode(file)), name_limit(base)
    if size > limit:
        raise I2VEditError(
            f"the {what} {short(name)!r} is too long: as a file ({short(file)!r}) it takes {size} bytes, and a "
            f"file saved in {base} can take at most {limit} (the file system's limit less room for the "
            f"temporary file a save writes first). Shorten it by at least {size - limit} bytes."
        )
    path = os.path.join(base, file)
    if os.path.lexists(path) and not overwrite:
        raise I2VEditError(f"{path} exists; choose another name or switch on overwrite.")
    try:  # the save's own first step, tried now: the folder and the file system accept this name
        fd, probe = tempfile.mkstemp(prefix=f".{file}.", suffix=".tmp", dir=base)
    except OSError as e:
        raise I2VEditError(
            f"cannot save {short(file)!r} in {base} ({type(e).__name__}: {e.strerror or e}); choose another "
            "name, or make the folder writable."
        ) from e
    os.close(fd)
    os.remove(probe)
    return path


@dataclass
class InversionState:
    """An ``I2V_INVERSION``: one clip's inversion and the base model (with CLIP vision and VAE) it ran on."""

    inversion: Inversion
    host: ComfySVDHost
    clip_index: int = 0


@dataclass
class EditState:
    """An ``I2V_EDIT``: one edited clip, for chaining the next clip and for skip-interval K/V."""

    clip: MatchedClip
    result: MatchedResult
    last_frame: torch.Tensor  # (1, H, W, 3), the decoded last frame


def host_of(model: Any, clip_vision: Any = None, vae: Any = None) -> ComfySVDHost:
    """The user's SVD as a host (a clear error for a MODEL that is not SVD img2vid)."""
    return ComfySVDHost(model, clip_vision, vae)


def check_frames(frames: torch.Tensor, what: str = "frames") -> torch.Tensor:
    """An IMAGE batch with at least one frame of at least one pixel, every value finite; RGB only."""
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[-1] < 3:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise I2VEditError(f"{what} must be an IMAGE batch (frames, height, width, 3), got {shape}.")
    n, h, w = frames.shape[:3]
    if n == 0:
        raise I2VEditError(
            f"{what} is an empty IMAGE batch (0 frames); connect an image or video with at least one frame "
            "(an upstream load, select or batch node may have picked nothing)."
        )
    if h == 0 or w == 0:
        raise I2VEditError(
            f"{what} has frames of {h}×{w} pixels, which hold no image; connect a real image (an upstream "
            "crop or resize may have produced an empty one)."
        )
    bad = nonfinite_frames(frames[..., :3])
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise I2VEditError(
            f"{what}: {len(bad)} of {n} frames hold NaN or infinite values (frame index {shown}); the node "
            "that made them failed (for example a VAE decode that overflowed in fp16). Fix or re-run that node; "
            "nothing was computed here."
        )
    return frames[..., :3]


def checkpoint_inputs(model_tooltip: str) -> list[io.Input]:
    """The MODEL, CLIP_VISION and VAE inputs that Image Only Checkpoint Loader feeds."""
    return [
        io.Model.Input("model", tooltip=model_tooltip),
        io.ClipVision.Input("clip_vision", tooltip="CLIP_VISION of the same checkpoint."),
        io.Vae.Input("vae", tooltip="VAE of the same checkpoint."),
    ]


def check_inversion(inversion: Any) -> InversionState:
    if not isinstance(inversion, InversionState):
        raise I2VEditError("connect the inversion output of 'EDM Invert SVD' or 'Load Inversion (I2VEdit)'.")
    return inversion


def check_kv(kv: Any, need_edit: bool = False) -> SkipInterval | None:
    """A connected ``I2V_KV`` (None when the optional socket is empty); ``need_edit`` for denoising."""
    if kv is None:
        return None
    if not isinstance(kv, SkipInterval) or kv.source is None or (need_edit and kv.edit[0] is None):
        raise I2VEditError(
            "skip_interval_kv must come from 'Skip-Interval KV Cache'"
            + (" with first_clip_edit connected." if need_edit else ".")
        )
    return kv


def check_resize(plan: Any) -> ResizePlan:
    if not isinstance(plan, ResizePlan):
        raise I2VEditError("connect the resize output of 'Fit Frames (I2VEdit)'.")
    return plan


def interrupted() -> bool:
    return comfy.model_management.processing_interrupted()


def throw_if_interrupted() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


def stop_run() -> None:
    """End the run the way a user's interrupt does, consuming ComfyUI's interrupt flag.

    Left set, the flag would interrupt the next prompt's first node.
    """
    comfy.model_management.throw_exception_if_processing_interrupted()  # clears the flag and raises, if set
    raise comfy.model_management.InterruptProcessingException()


class StepProgress:
    """A ProgressBar over model steps that stops the run cleanly when the user interrupts.

    ``preview_model`` (a MODEL) adds latent previews of each step's prediction where ComfyUI offers them.
    """

    def __init__(self, total: int, preview_model: Any = None) -> None:
        self.total, self.done, self.stop_requested = max(total, 1), 0, False
        self.bar = comfy.utils.ProgressBar(self.total)
        self.previewer = None
        if preview_model is not None:
            import latent_preview

            self.previewer = latent_preview.get_previewer(
                preview_model.load_device, preview_model.model.latent_format
            )

    def step(self, info: dict[str, Any] | None = None) -> None:
        throw_if_interrupted()
        self.done += 1
        preview = None
        if self.previewer is not None and info is not None and "denoised" in info:
            preview = self.previewer.decode_latent_to_preview_image("JPEG", info["denoised"][:1])
        self.bar.update_absolute(min(self.done, self.total), self.total, preview)

    def soft_step(self, info: dict[str, Any] | None = None) -> None:
        """A step that never raises: training polls ``should_stop`` and keeps the LoRA so far."""
        self.done += 1
        try:
            self.bar.update_absolute(min(self.done, self.total), self.total)
        except comfy.model_management.InterruptProcessingException:
            self.stop_requested = True  # the server's progress hook raised (and cleared the flag)

    def should_stop(self) -> bool:
        return self.stop_requested or interrupted()
