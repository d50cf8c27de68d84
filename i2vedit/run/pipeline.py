"""The whole edit of one video over any host: clips, inversion, motion LoRAs, matched denoising, chaining.

``edit_video`` takes the source frames at the generation size and one or more edited first frames,
and returns one edited video per edited frame (method.md §1):

for each clip (``chunk`` frames, overlapping the previous clip by ``overlap``):
  SARP → VAE latents → EDM inversion (base model) → motion LoRA (trained, or loaded from the reuse
  folder) → for each edit: matched denoising with the LoRA, conditioned on the edited first frame
  (clip 0) or on the previous edited clip's last frame (its final latent for the VAE branch, its
  decoded frame for CLIP), attending to the first clip's K/V (skip-interval) → decode.

All edits share each clip's inversion and LoRA. With a reuse folder every finished clip is saved
(safetensors + a manifest), so a run can resume at clip k, and a second run of the same video and
model reuses the inversions and LoRAs. ``edit_frames`` adds resizing/padding to a valid size and back.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import I2VEditError
from ..host import SVDHost
from ..io.files import read_tensors, save_safetensors_atomic
from ..io.frames import (
    FrameSource,
    ResizedSource,
    ResizeMode,
    ResizePlan,
    TensorSource,
    as_source,
    check_size,
    clip_ranges,
    fit_size,
    make_resize_plan,
    nonfinite_frames,
    resize_frames,
)
from ..lora.file import LoRAWeights, load_lora, save_lora
from ..lora.train import TrainConfig, latest_checkpoint, training_size
from ..method.controller import MatchConfig
from ..method.inversion import Inversion, MemoryMode, check_mode, invert
from ..method.matching import MatchedClip, MatchedResult
from ..method.region import DEFAULT_FEATHER, RegionLock, RegionTracker, check_region, composite, region_frames
from ..method.sarp import sarp
from ..method.skip_interval import SkipInterval
from ..precision import DtypeName, autocast_dtype, check_device, check_dtype, check_stored_weights
from ..seeds import Purpose, derived_seed, generator, train_seed
from ..svd import LATENT_SCALE
from .reuse import ReuseFolder, ReuseStore, Span, chain_key, edit_key
from .stages import (
    ClipEdit,
    cond_from,
    cond_tensors,
    denoise_time_ids,
    edit_clip,
    encode_source,
    load_inversion,
    save_inversion,
    source_latents,
    train_clip_lora,
    training_inputs,
)

log = logging.getLogger("i2vedit")

Progress = Callable[[dict[str, Any]], None]
FORMAT = "i2vedit.pipeline/3"
EDIT_FORMAT = "i2vedit.edit/1"
LORA_CHECKPOINTS = "lora_checkpoints"
INVERSION_FILE = "inversion.safetensors"
LORA_FILE = "lora.safetensors"
POLL_SECONDS = 1.0  # how often a process waiting for a clip another one prepares looks again
MAX_STEPS = 1000
MAX_LORA_STEPS = 100_000
MAX_CHUNK = 64
MAX_CFG = 50.0


@dataclass(frozen=True)
class EditSettings:
    """Everything that shapes the result, with the paper's values as defaults."""

    chunk: int = 14
    overlap: int = 1
    steps: int = 25
    match: MatchConfig | None = MatchConfig()  # noqa: RUF009  (frozen dataclass)
    cfg: tuple[float, float] = (1.0, 2.0)
    mode: MemoryMode = "recompute"
    skip_interval: bool = True
    lora_steps: int = 250
    lora_rank: int = 32
    lora_lr: float = 5e-4
    lora_target_set: str = "temporal"
    train_size: tuple[int, int] | None = (
        None  # None: about 512×896 at the clip's aspect, never above the video's
    )
    seed: int = 0
    sarp_noise: float = 0.005
    sarp_threshold: float = 0.001
    inversion_fps_id: float = 8.0
    decode_chunk: int = 8
    # bf16 / fp16: autocast for denoising, and for LoRA training; the inversion, the LoRA's weights and
    # optimiser state and the matching scores stay fp32 whatever these say (``precision``)
    denoise_dtype: DtypeName = "fp32"
    train_dtype: DtypeName = "fp32"
    # how the host stores its models' weights (they compute in fp32 whatever this is; the command line's
    # --weights-dtype, ``DiffusersSVDHost.store_weights``): a run's inversions, LoRAs and edits depend on it
    weights_dtype: DtypeName = "fp32"
    gradient_checkpointing: bool = True  # LoRA training recomputes in its backward: same LoRA, less memory
    region_feather: int = DEFAULT_FEATHER  # pixels a region lock fades over, inside its mask
    colour_anchor: bool = False  # hold each later clip's colours to the frame it continues from

    def validate(self) -> EditSettings:
        """Refuse, before any compute, every setting that is not finite or out of its sane range."""
        for name, value in (("CFG", self.cfg), ("SARP", (self.sarp_noise, self.sarp_threshold)),
                            ("LoRA learning rate", (self.lora_lr,)), ("inversion fps id", (self.inversion_fps_id,))):  # fmt: skip
            if not all(isinstance(v, int | float) and math.isfinite(v) for v in value):
                raise I2VEditError(f"{name} must be finite numbers, got {value}.")
        if not (len(self.cfg) == 2 and 0 < self.cfg[0] <= MAX_CFG and 0 < self.cfg[1] <= MAX_CFG):
            raise I2VEditError(
                f"CFG must be two scales (first frame, last frame) in (0, {MAX_CFG}], got {self.cfg}; "
                "the paper ramps 1 → 2."
            )
        if self.sarp_noise < 0 or self.sarp_threshold < 0:
            raise I2VEditError(
                f"SARP noise and threshold cannot be negative, got {self.sarp_noise}, {self.sarp_threshold}."
            )
        if not 0 < self.inversion_fps_id <= 1000:
            raise I2VEditError(f"the inversion fps id must lie in (0, 1000], got {self.inversion_fps_id}.")
        if not 0 <= self.seed < 2**63:
            raise I2VEditError(f"the seed must be a whole number from 0 to 2**63 - 1, got {self.seed}.")
        if not 0 <= self.region_feather <= 256:
            raise I2VEditError(f"the region feather must lie in [0, 256] pixels, got {self.region_feather}.")
        if self.decode_chunk < 1:
            raise I2VEditError(f"decode chunk must be at least 1 frame, got {self.decode_chunk}.")
        if self.chunk > MAX_CHUNK:
            raise I2VEditError(
                f"clip length {self.chunk} is more than {MAX_CHUNK} frames; SVD makes 14 (svd) or 25 (svd_xt)."
            )
        if self.steps > MAX_STEPS:
            raise I2VEditError(f"{self.steps} denoising steps is more than {MAX_STEPS}; the paper uses 25.")
        if self.lora_steps > MAX_LORA_STEPS:
            raise I2VEditError(
                f"{self.lora_steps} LoRA steps is more than {MAX_LORA_STEPS}; the paper trains 250 per clip."
            )
        if self.chunk < 2:
            raise I2VEditError(f"clip length must be at least 2 frames, got {self.chunk}.")
        if not 0 <= self.overlap < self.chunk:
            raise I2VEditError(f"overlap must lie in [0, clip length), got {self.overlap}.")
        if self.steps < 1:
            raise I2VEditError(f"denoising needs at least 1 step, got {self.steps}.")
        check_mode(self.mode)
        check_dtype(self.denoise_dtype, "denoising dtype")
        check_dtype(self.train_dtype, "LoRA training dtype")
        check_dtype(self.weights_dtype, "weights dtype")
        if self.match is not None:
            self.match.validate()
        TrainConfig(rank=self.lora_rank, steps=max(self.lora_steps, 1), lr=self.lora_lr,
                    target_set=self.lora_target_set).validate()  # fmt: skip
        if self.lora_steps < 0:
            raise I2VEditError(f"LoRA steps must be 0 (no LoRA) or more, got {self.lora_steps}.")
        return self

    def edit_identity(self) -> dict[str, Any]:
        """The settings an edit depends on beyond its clip's inversion and LoRA."""
        return {
            "match": asdict(self.match) if self.match is not None else None, "cfg": list(self.cfg),
            "mode": self.mode, "decode_chunk": self.decode_chunk,
            **_unless_fp32("denoise_dtype", self.denoise_dtype),
            **({"colour_anchor": True} if self.colour_anchor else {}),
        }  # fmt: skip

    def identity(self) -> dict[str, Any]:
        """The settings a reuse folder's inversions and LoRAs depend on."""
        return {
            "chunk": self.chunk, "overlap": self.overlap, "steps": self.steps, "skip_interval": self.skip_interval,
            "lora_steps": self.lora_steps, "lora_rank": self.lora_rank, "lora_lr": self.lora_lr,
            "lora_target_set": self.lora_target_set, "train_size": self.train_size, "seed": self.seed,
            "sarp": [self.sarp_noise, self.sarp_threshold], "inversion_fps_id": self.inversion_fps_id,
            **_unless_fp32("train_dtype", self.train_dtype), **_unless_fp32("weights_dtype", self.weights_dtype),
        }  # fmt: skip


def _unless_fp32(key: str, name: str) -> dict[str, str]:
    """An identity entry for a reduced dtype; none for fp32, so folders written before the choice existed
    keep their keys."""
    return {} if name == "fp32" else {key: name}


@dataclass
class EditResult:
    """Per edited first frame: the video, its difference masks and (with a region lock) its region masks.

    A run given a ``ClipSink`` hands every clip to it as it is made, and these lists stay empty.
    """

    videos: list[torch.Tensor]  # one (frames, H, W, 3) IMAGE per edited first frame
    masks: list[torch.Tensor]  # one (frames, H, W) difference mask per edit (zeros without matching)
    report: dict[str, Any] = field(default_factory=dict)
    regions: list[torch.Tensor] | None = None  # one (frames, H, W) region-lock mask per edit, or no lock


# (edit, index of the first frame in the video, frames, difference masks, region masks or None): the frames
# a clip adds to one edit's video (its overlap with the previous clip left out), in order
ClipSink = Callable[[int, int, torch.Tensor, torch.Tensor, "torch.Tensor | None"], None]


class _Collected:
    """A ``ClipSink`` that keeps every clip: the whole videos, for callers that want them in memory."""

    def __init__(self, edits: int) -> None:
        self.parts: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = [
            [] for _ in range(edits)
        ]

    def __call__(
        self, e: int, start: int, frames: torch.Tensor, masks: torch.Tensor, region: torch.Tensor | None
    ) -> None:
        self.parts[e].append((frames, masks, region))

    def fill(self, result: EditResult) -> EditResult:
        result.videos = [torch.cat([f for f, _, _ in parts]) for parts in self.parts]
        result.masks = [torch.cat([m for _, m, _ in parts]) for parts in self.parts]
        if all(r is not None for parts in self.parts for _, _, r in parts):
            result.regions = [torch.cat([r for _, _, r in parts if r is not None]) for parts in self.parts]
        return result


def _digest(source: FrameSource, block: int) -> str:
    """A digest of the frames' 8-bit values, read ``block`` frames at a time."""
    h = hashlib.sha1()
    for start in range(0, source.count, block):
        frames = source.read(start, min(source.count, start + block))
        h.update(
            (frames.detach().float().cpu().clamp(0, 1) * 255)
            .round()
            .to(torch.uint8)
            .contiguous()
            .numpy()
            .tobytes()
        )
    return h.hexdigest()[:16]


class Timer:
    """Adds up the wall time and calls of each stage of a run, and reports each stage as it starts."""

    def __init__(self, progress: Progress | None, clips: int) -> None:
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.progress, self.clips, self.t0 = progress, clips, time.perf_counter()

    @contextmanager
    def __call__(self, name: str, clip: int) -> Iterator[None]:
        """Time the block as stage ``name`` of clip ``clip`` (a stage that raises is not counted)."""
        if self.progress is not None:
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / clip * (self.clips - clip) if clip else None
            self.progress({"stage": name, "clip": clip, "clips": self.clips, "elapsed": elapsed, "eta": eta})
        t = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t
        self.counts[name] = self.counts.get(name, 0) + 1


def video_clip_ranges(frames: int, settings: EditSettings) -> list[tuple[int, int]]:
    """The clips ``edit_video`` cuts a video of ``frames`` frames into (a shorter video: one clip)."""
    return clip_ranges(frames, min(settings.chunk, frames), settings.overlap) if frames > 1 else [(0, 1)]


def training_hw(height: int, width: int, settings: EditSettings) -> tuple[int, int]:
    """The size ``edit_video`` trains LoRAs at: ``settings.train_size``, else about 512×896, never above the video."""
    hw = settings.train_size or training_size(height, width)
    return (height, width) if hw[0] * hw[1] > height * width else (int(hw[0]), int(hw[1]))


def _check_inputs(source: FrameSource, fps: float, edits: list[torch.Tensor]) -> tuple[int, int, int]:
    n, height, width = source.count, source.height, source.width
    check_size(height, width)
    if isinstance(source, TensorSource) and nonfinite_frames(
        source.frames
    ):  # a file's frames are always finite
        raise I2VEditError("the video frames hold NaN or inf values; give frames in [0, 1].")
    for e, img in enumerate(edits):  # none for a worker that only prepares clips
        if tuple(img.shape) != (1, height, width, 3):
            raise I2VEditError(
                f"edited frame {e} is {tuple(img.shape)}, the video is (1, {height}, {width}, 3); use edit_frames, "
                "which resizes it, or resize it to the video's size."
            )
        if nonfinite_frames(img):
            raise I2VEditError(f"edited frame {e} holds NaN or inf values; give an image in [0, 1].")
    if not (isinstance(fps, int | float) and math.isfinite(fps) and fps > 0):
        raise I2VEditError(f"frame rate must be a positive number, got {fps}.")
    return n, height, width


Region = torch.Tensor | str | None  # a MASK, "auto", or no region lock


class Regions:
    """The region lock of a run, clip by clip: one given MASK for every edit, or each edit's automatic mask
    (``RegionTracker``, fed the clips in order). Checked before any compute."""

    def __init__(self, source: FrameSource, edits: list[torch.Tensor], region: torch.Tensor | str) -> None:
        self.mask: torch.Tensor | None = None
        self.trackers: list[RegionTracker] = []
        if isinstance(region, str):
            if region != "auto":
                raise I2VEditError(f"a region lock is a MASK or 'auto', got {region!r}.")
            first = source.read(0, 1)
            self.trackers = [
                RegionTracker(first, img) for img in edits
            ]  # refuses an edit that changes nothing
            self.held: list[tuple[int, torch.Tensor]] = [(0, torch.empty(0))] * len(edits)
        else:
            self.mask = check_region(region, source.count, source.height, source.width)

    @staticmethod
    def make(source: FrameSource, edits: list[torch.Tensor], region: Region) -> Regions | None:
        """None without a lock, or with a mask that covers every pixel (said in the log)."""
        if region is None:
            return None
        regions = Regions(source, edits, region)
        if regions.mask is not None and float(regions.mask.min()) == 1:
            log.info("the region mask covers every pixel, so the edit runs without a region lock")
            return None
        return regions

    def identity(self, e: int) -> dict[str, Any]:
        """What of the lock shapes edit ``e`` (for its reuse key)."""
        if self.mask is None:
            tracker = self.trackers[e]
            return {"region": "auto", "region_dilate": tracker.dilate}
        return {"region": hashlib.sha256(self.mask.numpy().tobytes()).hexdigest()[:20]}

    def clip(self, e: int, start: int, frames: torch.Tensor) -> torch.Tensor:
        """Edit ``e``'s masks of the clip ``frames`` that starts at frame ``start`` (clips come in order)."""
        if self.mask is not None:
            return region_frames(self.mask, start, start + frames.shape[0])
        first, held = self.held[e]  # the masks of the previous clip: its overlap frames are this clip's first
        seen = first + held.shape[0]
        new = self.trackers[e].advance(frames[seen - start :])
        masks = torch.cat([held[start - first :], new]) if seen > start else new
        self.held[e] = (start, masks)
        return masks


def edit_video(
    host: SVDHost,
    frames: torch.Tensor | FrameSource,
    fps: float,
    edits: list[torch.Tensor],
    settings: EditSettings = EditSettings(),
    reuse_dir: str | Path | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    step_callback: Progress | None = None,
    region: Region = None,
    sink: ClipSink | None = None,
) -> EditResult:
    """Edit ``frames`` (N, H, W, 3) at a valid generation size with each edited first frame (1, H, W, 3).

    ``progress`` hears of each stage of each clip; ``step_callback`` of each model step (inversion,
    training, denoising; it may raise to interrupt: finished clips, and the LoRA training so far,
    stay in the reuse folder); ``should_stop`` is polled between clips and training steps.
    ``region``: a region lock (``Regions``): outside it the output is the source's pixels.
    ``frames`` may be a ``FrameSource`` (a video file read clip by clip) and ``sink`` a ``ClipSink`` (a
    writer): then the run holds one clip at a time, whatever the video's length.
    """
    settings = settings.validate()
    source = as_source(frames)
    if not edits:
        raise I2VEditError("give at least one edited first frame.")
    n, height, width = _check_inputs(source, fps, edits)
    regions = Regions.make(source, edits, region)
    collected = None
    if sink is None:
        sink = collected = _Collected(len(edits))
    run = _Run.start(host, source, fps, edits, settings, reuse_dir, progress, should_stop, step_callback, regions,
                     sink)  # fmt: skip
    folder = run.store.folder
    with folder if folder is not None else nullcontext():
        for i in range(len(run.ranges)):
            run.clip(i)
    report = {
        "frames": n, "clips": len(run.ranges), "clip_ranges": run.ranges, "edits": len(edits),
        "size": [height, width], "train_size": list(run.train_hw), "seconds": run.timer.seconds,
        "calls": run.timer.counts, "stored_bytes": run.stored, "edit_keys": run.keys, "warnings": run.store.warnings,
        "dtypes": {"weights": settings.weights_dtype, "denoise": settings.denoise_dtype, "train": settings.train_dtype},
        "prepared_here": run.prepared_here,
    }  # fmt: skip
    result = EditResult([], [], report)
    return collected.fill(result) if collected is not None else result


def prepare_clips(
    host: SVDHost,
    frames: torch.Tensor | FrameSource,
    fps: float,
    settings: EditSettings,
    reuse_dir: str | Path,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    step_callback: Progress | None = None,
    size: tuple[int, int] | None = None,
    resize_mode: ResizeMode = "pad",
) -> dict[str, Any]:
    """A worker of a clip-parallel run: inversions and motion LoRAs of the clips nobody else has, into the
    shared ``reuse_dir``, claimed one at a time (clip 0 first: the others need its inversion), until every
    clip is done or taken. Another process (``edit_video`` on the same folder) denoises the chain as the
    clips are ready. ``frames`` at any size with ``size``/``resize_mode`` as ``edit_frames`` takes them.
    """
    settings = settings.validate()
    fitted = ResizedSource(*_fit(as_source(frames), size, resize_mode))
    _check_inputs(fitted, fps, [])
    run = _Run.start(host, fitted, fps, [], settings, reuse_dir, progress, should_stop, step_callback, None,
                     lambda *a: None, worker=True)  # fmt: skip
    for i in range(len(run.ranges)):
        run._stop_check(f"before clip {i + 1} of {len(run.ranges)}")
        run.prepare_if_free(i)
    return {"clips": len(run.ranges), "prepared_here": run.prepared_here, "seconds": run.timer.seconds,
            "warnings": run.store.warnings}  # fmt: skip


class _Run:
    """One ``edit_video`` run: the method clip by clip, with what carries from clip to clip."""

    def __init__(self, host: SVDHost, fingerprint: str, source: FrameSource, fps: float, edits: list[torch.Tensor],
                 settings: EditSettings, store: ReuseStore, train_hw: tuple[int, int], ranges: list[Span],
                 progress: Progress | None, should_stop: Callable[[], bool] | None,
                 step_callback: Progress | None, regions: Regions | None, sink: ClipSink) -> None:  # fmt: skip
        self.host, self.fingerprint, self.settings = host, fingerprint, settings
        self.source, self.edits, self.regions, self.sink = source, edits, regions, sink
        self.store, self.train_hw, self.ranges = store, train_hw, ranges
        self.should_stop, self.step_callback = should_stop, step_callback
        self.size = (source.height, source.width)
        self.keys = [
            edit_key(img, {**settings.edit_identity(), **self._region_identity(e)})
            for e, img in enumerate(edits)
        ]
        self.timer = Timer(progress, len(ranges))
        self.denoise_ids = denoise_time_ids(fps)
        self.skip = SkipInterval(settings.skip_interval, len(edits), capture=settings.mode == "cache")
        # per edit: the previous edited clip's final last-frame latent and decoded last frame
        self.prev: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(edits)
        self.perturbed0: torch.Tensor | None = None
        self.first: Inversion | None = None  # clip 0's inversion, once read or made (skip-interval's source)
        self.stored = 0
        self.prepared_here: list[int] = []  # clips whose inversion or LoRA this process computed

    @classmethod
    def start(cls, host: SVDHost, source: FrameSource, fps: float, edits: list[torch.Tensor], settings: EditSettings,
              reuse_dir: str | Path | None, progress: Progress | None, should_stop: Callable[[], bool] | None,
              step_callback: Progress | None, regions: Regions | None, sink: ClipSink, worker: bool = False) -> _Run:  # fmt: skip
        """Check what the run needs before any compute and open its reuse folder (``worker``: shared)."""
        n, height, width = source.count, source.height, source.width
        ranges = video_clip_ranges(n, settings)
        if ranges[0][1] - ranges[0][0] < 2:
            raise I2VEditError("the video has a single frame; SVD needs at least 2 frames.")
        train_hw = training_hw(height, width, settings)
        check_size(*train_hw)
        check_device(host.device, settings.denoise_dtype, "denoising dtype")
        check_device(host.device, settings.train_dtype, "LoRA training dtype")
        stored = getattr(host, "weights_dtype", None)  # said by the hosts that choose it (diffusers)
        check_stored_weights(stored, settings.weights_dtype)
        fingerprint = host.fingerprint()
        folder = None
        if reuse_dir is not None:
            identity = {
                "format": FORMAT, "video": _digest(source, settings.chunk), "model": fingerprint,
                "settings": settings.identity(), "frames": n, "size": [height, width],
            }  # fmt: skip
            folder = ReuseFolder(reuse_dir, identity, worker=worker)
        return cls(host, fingerprint, source, fps, edits, settings, ReuseStore(folder), train_hw, ranges, progress,
                   should_stop, step_callback, regions, sink)  # fmt: skip

    def _region_identity(self, e: int) -> dict[str, Any]:
        if self.regions is None:
            return {}
        return {**self.regions.identity(e), "region_feather": self.settings.region_feather}

    def _stop_check(self, what: str) -> None:
        if self.should_stop is not None and self.should_stop():
            raise I2VEditError(f"interrupted {what}; finished clips are in the reuse folder.")

    def _sarp(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip ``i``'s frames and their SARP-perturbed copy."""
        s, span = self.settings, self.ranges[i]
        with self.timer("sarp", i):
            frames = self.source.read(*span)
            checked = isinstance(self.source, TensorSource)  # a tensor is checked whole, before any compute
            if not checked and nonfinite_frames(frames):
                raise I2VEditError(f"frames {span[0]}..{span[1] - 1} of the video hold NaN or inf values.")
            perturbed, _ = sarp(frames, derived_seed(s.seed, i, Purpose.SARP), s.sarp_noise, s.sarp_threshold)
        if i == 0:
            self.perturbed0 = perturbed
        return frames, perturbed

    def _ready(self, i: int) -> bool:
        """Whether clip ``i``'s inversion (and LoRA) lie in the reuse folder."""
        folder = self.store.folder
        return (
            folder is not None
            and folder.has(i, INVERSION_FILE)
            and (self.settings.lora_steps == 0 or folder.has(i, LORA_FILE))
        )

    def _prepare(self, i: int, perturbed: torch.Tensor) -> tuple[Inversion, SVDHost]:
        """Clip ``i``'s inversion and motion-LoRA model: stored or computed (and stored)."""
        span, ready = self.ranges[i], self._ready(i)
        inv = self._inversion(i, span, perturbed)
        lora_host = (
            self.host.with_lora(self._lora(i, span, perturbed, inv))
            if self.settings.lora_steps > 0
            else self.host
        )
        if not ready:
            self.prepared_here.append(i)
        return inv, lora_host

    def prepare_if_free(self, i: int) -> bool:
        """Prepare clip ``i`` (inversion, LoRA) if it is neither in the folder nor claimed by another process."""
        folder = self.store.folder
        if folder is None or self._ready(i) or not folder.claim(i):
            return False
        try:
            if i > 0:
                self._first_inversion()
            self._prepare(i, self._sarp(i)[1])
        finally:
            folder.release_claim(i)
        return True

    def _first_inversion(self) -> None:
        """Clip 0's inversion (the skip-interval K/V's source) from the folder, once clip 0 is ready."""
        folder = self.store.folder
        if self.first is not None or folder is None:
            return
        while not folder.has(0, INVERSION_FILE):
            if not self.prepare_if_free(0):
                self._stop_check("while waiting for clip 1's inversion")
                time.sleep(POLL_SECONDS)
        if self.first is None:  # prepare_if_free(0) read it, or another process made clip 0
            self._inversion(0, self.ranges[0], self._sarp(0)[1])

    def clip(self, i: int) -> None:
        """SARP → inversion (base model) → motion LoRA → each edit's matched denoising, chained.

        With a reuse folder, a clip another process is preparing is waited for (preparing later free
        clips meanwhile), and this process claims the clip it prepares itself.
        """
        self._stop_check(f"before clip {i + 1} of {len(self.ranges)}")
        frames, perturbed = self._sarp(i)  # before any wait: preparing later clips reads on past this one
        folder, holding = self.store.folder, False
        while folder is not None and not self._ready(i):
            if folder.claim(i):
                holding = True
                break
            if not any(self.prepare_if_free(j) for j in range(i + 1, len(self.ranges))):
                self._stop_check(f"while waiting for clip {i + 1}, which another process prepares")
                time.sleep(POLL_SECONDS)
        try:
            inv, lora_host = self._prepare(i, perturbed)
        finally:
            if holding and folder is not None:
                folder.release_claim(i)
        for e in range(len(self.edits)):
            self._edit(i, self.ranges[i], e, inv, lora_host, frames)

    def _inversion(self, i: int, span: Span, perturbed: torch.Tensor) -> Inversion:
        s = self.settings

        def read(path: Path) -> tuple[Inversion, dict[str, str]]:
            inv, meta = load_inversion(path)
            inv.fingerprint = self.fingerprint  # the manifest already proved the model
            return inv, meta

        def make() -> Inversion:
            with self.timer("encode", i):
                latents, cond = encode_source(self.host, perturbed, generator(s.seed, i, Purpose.ENCODE),
                                              s.inversion_fps_id)  # fmt: skip
            with self.timer("invert", i):
                return invert(self.host, latents, cond, s.steps, s.mode, capture_kv=self.skip.capture_kv(i),
                              skip_kv=self.skip.for_inversion(i), callback=_tagged(self.step_callback, i, "invert"))  # fmt: skip

        inv, stored = self.store.get(i, span, INVERSION_FILE, read, make, save_inversion)
        if stored:
            inv.skip_kv = self.skip.for_inversion(i)
        if i == 0:
            self.first = inv
            self.skip.first_inversion(self.host, inv)
        self.stored += inv.stored_bytes()
        return inv

    def _lora(self, i: int, span: Span, perturbed: torch.Tensor, inv: Inversion) -> LoRAWeights:
        def read(path: Path) -> tuple[LoRAWeights, dict[str, str]]:
            weights = load_lora(path)
            return weights, weights.extra_metadata

        def write(path: Path, weights: LoRAWeights, meta: dict[str, str]) -> None:
            save_lora(path, replace(weights, extra_metadata={**weights.extra_metadata, **meta}))
            shutil.rmtree(path.parent / LORA_CHECKPOINTS, ignore_errors=True)

        return self.store.get(i, span, LORA_FILE, read, lambda: self._train(i, perturbed, inv), write)[0]

    def _train(self, i: int, perturbed: torch.Tensor, inv: Inversion) -> LoRAWeights:
        s = self.settings
        full_size = self.train_hw == self.size
        skip_kv = self.skip.for_training(i, self.host, None if full_size else self._first_clip_at_train_res)
        checkpoints, resume = self._checkpoints(i)
        if full_size:
            latents, first_raw, clip_embed = training_inputs(inv)
        else:  # the clip again at training size: latents and the first frame's CLIP embedding
            small = resize_frames(perturbed, *self.train_hw)
            latents = source_latents(self.host, small, generator(s.seed, i, Purpose.TRAIN_ENCODE))
            first_raw, clip_embed = latents[:1] / LATENT_SCALE, self.host.encode_clip(small[:1])
        config = TrainConfig(rank=s.lora_rank, steps=s.lora_steps, lr=s.lora_lr, target_set=s.lora_target_set,
                             seed=train_seed(s.seed, i))  # fmt: skip
        with self.timer("lora", i):
            result = train_clip_lora(self.host, latents, first_raw, clip_embed, config, i, skip_kv,
                                     should_stop=self.should_stop, callback=self._beating(i, _tagged(self.step_callback, i, "lora")),
                                     checkpoint_dir=checkpoints, resume_from=resume,
                                     autocast_dtype=autocast_dtype(s.train_dtype),
                                     gradient_checkpointing=s.gradient_checkpointing)  # fmt: skip
        if result.interrupted:
            raise I2VEditError(
                f"interrupted while training the LoRA of clip {i + 1}; finished clips"
                + (" and the training so far are kept" if checkpoints is not None else " are kept")
                + "."
            )
        return result.weights

    def _beating(self, i: int, callback: Progress | None) -> Progress | None:
        """``callback``, and each step also touches this process's claim of clip ``i`` (``heartbeat``)."""
        folder = self.store.folder
        if folder is None:
            return callback

        def beat(info: dict[str, Any]) -> None:
            folder.heartbeat(i)
            if callback is not None:
                callback(info)

        return beat

    def _first_clip_at_train_res(self) -> Inversion:
        """The first clip inverted again at training resolution, for later clips' training K/V."""
        s = self.settings
        assert self.perturbed0 is not None
        small = resize_frames(self.perturbed0, *self.train_hw)
        latents, cond = encode_source(
            self.host, small, generator(s.seed, 0, Purpose.TRAIN_RES), s.inversion_fps_id
        )
        with self.timer("invert_train_res", 0):
            return invert(self.host, latents, cond, s.steps,
                          callback=_tagged(self.step_callback, 0, "invert_train_res"))  # fmt: skip

    def _checkpoints(self, i: int) -> tuple[Path | None, Path | None]:
        """Clip ``i``'s LoRA checkpoint folder in the reuse folder, and a usable checkpoint to resume from."""
        folder = self.store.folder
        if folder is None:
            return None, None
        checkpoints = folder.clip_dir(i) / LORA_CHECKPOINTS
        checkpoints.mkdir(exist_ok=True)
        resume = latest_checkpoint(checkpoints)
        if resume is not None:
            try:
                load_lora(resume)
            except I2VEditError as e:
                folder.warn(f"the LoRA checkpoint {resume} cannot be used ({e}); training from step 0.")
                shutil.rmtree(checkpoints, ignore_errors=True)
                checkpoints.mkdir()
                resume = None
        return checkpoints, resume

    def _edit(
        self, i: int, span: Span, e: int, inv: Inversion, lora_host: SVDHost, frames: torch.Tensor
    ) -> None:
        s = self.settings
        prev = self.prev[e]
        key = chain_key(self.keys[e], prev)
        # an inversion read back from the reuse folder holds no captures: replay them (exact, slower)
        mode: MemoryMode = s.mode if inv.captures is not None else "recompute"
        skip_kv = self.skip.for_denoising(i, e)
        region = self.regions.clip(e, span[0], frames) if self.regions is not None else None
        lock = RegionLock(region, s.region_feather) if region is not None else None

        def read(path: Path) -> tuple[ClipEdit, dict[str, str]]:
            t, meta = read_tensors(path)
            try:
                clip = MatchedClip(
                    lora_host, inv, cond_from("cond", t), s.match, s.cfg, mode, self.host, skip_kv, lock=lock
                )
                return ClipEdit(
                    clip, MatchedResult(t["latents"], t["trajectory"], None), t["frames"], t["masks"]
                ), meta
            except KeyError as err:
                raise I2VEditError(f"it lacks {err}") from None

        def make() -> ClipEdit:
            edit = edit_clip(self.host, lora_host, inv, self.edits[e], prev, self.denoise_ids,
                             generator(s.seed, i, Purpose.CONDITION, e), s.match, s.cfg, mode, skip_kv,
                             self.skip.capture_kv(i), s.decode_chunk, _tagged(self.step_callback, i, "denoise"),
                             stage=lambda name: self.timer(name, i),
                             compute_dtype=autocast_dtype(s.denoise_dtype), lock=lock,
                             colour_reference=prev[0][0] if s.colour_anchor and prev is not None else None)  # fmt: skip
            if region is not None:
                edit.frames = composite(frames, edit.frames, region, s.region_feather)
            return edit

        def write(path: Path, edit: ClipEdit, meta: dict[str, str]) -> None:
            tensors = {"latents": edit.result.latents, "trajectory": edit.result.trajectory, "frames": edit.frames,
                       "masks": edit.masks, **cond_tensors("cond", edit.clip.cond)}  # fmt: skip
            save_safetensors_atomic(
                path, tensors, {"format": EDIT_FORMAT, "edit_key": self.keys[e], "chain_key": key, **meta}
            )

        edit, _ = self.store.get(i, span, f"edit_{key}.safetensors", read, make, write)
        if i == 0 and (edit_kv := self.skip.first_edit(e, edit.clip, edit.result)) is not None:
            self.stored += edit_kv.stored_bytes()
        self.prev[e] = (edit.result.latents[-1:], edit.frames[-1:])
        k = s.overlap if i > 0 else 0  # the overlap frames are the previous clip's
        self.sink(e, span[0] + k, edit.frames[k:], edit.masks[k:], region[k:] if region is not None else None)


def _tagged(callback: Progress | None, clip: int, stage: str) -> Progress | None:
    """A step callback that also says which clip and stage the step belongs to."""
    if callback is None:
        return None
    return lambda info: callback({**info, "clip": clip, "stage": stage})


def _fit(
    source: FrameSource, size: tuple[int, int] | None, mode: ResizeMode
) -> tuple[FrameSource, ResizePlan]:
    """The source and the plan to its generation size (``size``, else within 1024 at a multiple of 64)."""
    return source, make_resize_plan(
        source.height, source.width, *(size or fit_size(source.height, source.width)), mode=mode
    )


def edit_frames(
    host: SVDHost,
    frames: torch.Tensor | FrameSource,
    fps: float,
    edits: list[torch.Tensor],
    settings: EditSettings = EditSettings(),
    size: tuple[int, int] | None = None,
    resize_mode: ResizeMode = "pad",
    sink: ClipSink | None = None,
    **kw: Any,
) -> EditResult:
    """``edit_video`` for frames of any size: resize/pad to ``size`` (default: fit within 1024) and back.

    An edited frame of another size than the video is resized to it, with a logged warning. A region
    lock (``region``) is given at the video's size, and the output is composited at that size. ``sink``
    gets the clips at the video's size (``edit_video``).
    """
    source, plan = _fit(as_source(frames), size, resize_mode)
    n, h, w = source.count, source.height, source.width
    fitted = []
    for e, img in enumerate(edits):
        if img.ndim == 3:
            img = img.unsqueeze(0)
        if tuple(img.shape[1:3]) != (h, w):
            log.warning("edited frame %d is %dx%d, the video %dx%d: resizing it to the video's size",
                        e, img.shape[1], img.shape[2], h, w)  # fmt: skip
            img = resize_frames(img[..., :3], h, w)
        fitted.append(plan.apply(img[..., :3]))
    region: Region = kw.pop("region", None)
    mask = check_region(region, n, h, w) if isinstance(region, torch.Tensor) else None
    if mask is not None:
        fitted_mask = plan.apply(mask.unsqueeze(-1))[..., 0]
        fitted_mask[:, plan.pad_mask()] = 0.0  # padding stays as it was
        region = fitted_mask
    collected = None
    if sink is None:
        sink = collected = _Collected(len(edits))
    out = sink

    def at_source_size(
        e: int, start: int, video: torch.Tensor, masks: torch.Tensor, lock: torch.Tensor | None
    ) -> None:
        end = start + video.shape[0]
        video, masks = plan.invert(video), plan.invert(masks.unsqueeze(-1))[..., 0]
        if lock is not None:  # composited again at the source's own size: its pixels, exactly
            lock = (
                region_frames(mask, start, end)
                if mask is not None
                else plan.invert(lock.unsqueeze(-1))[..., 0].clamp(0, 1)
            )
            video = composite(source.read(start, end), video, lock, settings.region_feather)
        out(e, start, video, masks, lock)

    result = edit_video(
        host, ResizedSource(source, plan), fps, fitted, settings, region=region, sink=at_source_size, **kw
    )
    result.report["source_size"] = [h, w]
    result.report["settings"] = asdict(settings)
    return collected.fill(result) if collected is not None else result
