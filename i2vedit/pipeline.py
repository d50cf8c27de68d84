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
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import clips as C
from .control import MatchConfig
from .errors import I2VEditError
from .files import save_safetensors_atomic, writable_folder
from .hosts.base import LATENT_SCALE, SVDHost
from .inversion import Inversion, MemoryMode, check_mode, invert
from .lora_file import load_lora, save_lora
from .lora_train import TrainConfig, training_size
from .matched import EditKV, MatchedClip, MatchedResult, SourceKV
from .sarp import sarp
from .stages import (
    SEED_CONDITION,
    SEED_ENCODE,
    SEED_SARP,
    SEED_TRAIN,
    SEED_TRAIN_ENCODE,
    SEED_TRAIN_RES,
    cond_from,
    cond_tensors,
    denoise_time_ids,
    derived_seed,
    edit_conditioning,
    encode_source,
    generator,
    load_inversion,
    save_inversion,
    train_clip_lora,
)

log = logging.getLogger("i2vedit")

Progress = Callable[[dict[str, Any]], None]
MANIFEST = "manifest.json"
FORMAT = "i2vedit.pipeline/2"


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

    def validate(self) -> EditSettings:
        if self.chunk < 2:
            raise I2VEditError(f"clip length must be at least 2 frames, got {self.chunk}.")
        if not 0 <= self.overlap < self.chunk:
            raise I2VEditError(f"overlap must lie in [0, clip length), got {self.overlap}.")
        if self.steps < 1:
            raise I2VEditError(f"denoising needs at least 1 step, got {self.steps}.")
        check_mode(self.mode)
        if self.match is not None:
            self.match.validate()
        TrainConfig(rank=self.lora_rank, steps=max(self.lora_steps, 1), lr=self.lora_lr,
                    target_set=self.lora_target_set).validate()  # fmt: skip
        if self.lora_steps < 0:
            raise I2VEditError(f"LoRA steps must be 0 (no LoRA) or more, got {self.lora_steps}.")
        return self

    def identity(self) -> dict[str, Any]:
        """The settings a reuse folder's inversions and LoRAs depend on."""
        return {
            "chunk": self.chunk, "overlap": self.overlap, "steps": self.steps, "skip_interval": self.skip_interval,
            "lora_steps": self.lora_steps, "lora_rank": self.lora_rank, "lora_lr": self.lora_lr,
            "lora_target_set": self.lora_target_set, "train_size": self.train_size, "seed": self.seed,
            "sarp": [self.sarp_noise, self.sarp_threshold], "inversion_fps_id": self.inversion_fps_id,
        }  # fmt: skip


@dataclass
class EditResult:
    videos: list[torch.Tensor]  # one (frames, H, W, 3) IMAGE per edited first frame
    masks: list[torch.Tensor]  # one (frames, H, W) difference mask per edit (zeros without matching)
    report: dict[str, Any] = field(default_factory=dict)


def _digest(t: torch.Tensor) -> str:
    data = (t.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
    return hashlib.sha1(data.numpy().tobytes()).hexdigest()[:16]


class _Timer:
    def __init__(self, progress: Progress | None, clips: int) -> None:
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.progress, self.clips, self.t0 = progress, clips, time.perf_counter()

    def stage(self, name: str, clip: int, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """Run ``fn(*args, **kw)`` as stage ``name`` of clip ``clip``: report progress, add up its time."""
        if self.progress is not None:
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / clip * (self.clips - clip) if clip else None
            self.progress({"stage": name, "clip": clip, "clips": self.clips, "elapsed": elapsed, "eta": eta})
        t = time.perf_counter()
        out = fn(*args, **kw)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t
        self.counts[name] = self.counts.get(name, 0) + 1
        return out


class ReuseFolder:
    """A folder holding per-clip inversions, LoRAs and edits of one video and model, with a manifest."""

    def __init__(self, path: str | Path, identity: dict[str, Any]) -> None:
        self.path = writable_folder(path, "reuse folder")
        self.identity = identity
        manifest = self.path / MANIFEST
        if manifest.exists():
            try:
                old = json.loads(manifest.read_text())
            except (OSError, ValueError) as e:
                raise I2VEditError(
                    f"{manifest} is unreadable ({e}); delete the folder or choose another."
                ) from e
            for key in ("format", "video", "model", "settings"):
                if old.get(key) != identity.get(key):
                    raise I2VEditError(
                        f"the reuse folder {self.path} belongs to another {key} ({old.get(key)!r}, this run has "
                        f"{identity.get(key)!r}); its inversions and LoRAs cannot be reused. Choose another folder."
                    )
        else:
            manifest.write_text(json.dumps(identity, indent=1))

    def clip_dir(self, i: int) -> Path:
        d = self.path / f"clip_{i:03d}"
        d.mkdir(exist_ok=True)
        return d

    def has(self, i: int, name: str) -> bool:
        return (self.path / f"clip_{i:03d}" / name).is_file()

    def save(
        self, i: int, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None
    ) -> None:
        save_safetensors_atomic(self.clip_dir(i) / name, tensors, meta)

    def load(self, i: int, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        from safetensors import safe_open

        path = self.path / f"clip_{i:03d}" / name
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            return load_file(str(path)), meta
        except (OSError, SafetensorError) as e:
            raise I2VEditError(f"{path} is damaged ({e}); delete it to recompute that clip.") from e


def video_clip_ranges(frames: int, settings: EditSettings) -> list[tuple[int, int]]:
    """The clips ``edit_video`` cuts a video of ``frames`` frames into (a shorter video: one clip)."""
    return C.clip_ranges(frames, min(settings.chunk, frames), settings.overlap) if frames > 1 else [(0, 1)]


def edit_video(
    host: SVDHost,
    frames: torch.Tensor,
    fps: float,
    edits: list[torch.Tensor],
    settings: EditSettings = EditSettings(),
    reuse_dir: str | Path | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    step_callback: Progress | None = None,
) -> EditResult:
    """Edit ``frames`` (N, H, W, 3) at a valid generation size with each edited first frame (1, H, W, 3).

    ``progress`` hears of each stage of each clip; ``step_callback`` of each model step (inversion,
    training, denoising; it may raise to interrupt, finished clips stay in the reuse folder);
    ``should_stop`` is polled between clips and training steps.
    """
    settings = settings.validate()
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise I2VEditError(f"frames must be an IMAGE batch (N, H, W, 3), got {tuple(frames.shape)}.")
    n, height, width, _ = frames.shape
    C.check_size(height, width)
    if not edits:
        raise I2VEditError("give at least one edited first frame.")
    for e, img in enumerate(edits):
        if tuple(img.shape) != (1, height, width, 3):
            raise I2VEditError(
                f"edited frame {e} is {tuple(img.shape)}, the video is (1, {height}, {width}, 3); use edit_frames, "
                "which resizes it, or resize it to the video's size."
            )
    if fps <= 0:
        raise I2VEditError(f"frame rate must be positive, got {fps}.")
    fingerprint = host.fingerprint()
    ranges = video_clip_ranges(n, settings)
    if ranges[0][1] - ranges[0][0] < 2:
        raise I2VEditError("the video has a single frame; SVD needs at least 2 frames.")
    identity = {
        "format": FORMAT, "video": _digest(frames), "model": fingerprint, "settings": settings.identity(),
        "frames": n, "size": [height, width],
    }  # fmt: skip
    reuse = ReuseFolder(reuse_dir, identity) if reuse_dir is not None else None
    timer = _Timer(progress, len(ranges))
    train_hw = settings.train_size or training_size(height, width)
    if train_hw[0] * train_hw[1] > height * width:
        train_hw = (height, width)
    C.check_size(*train_hw)
    denoise_ids = denoise_time_ids(fps)
    cache_kv = settings.mode == "cache" and settings.skip_interval
    outputs: list[list[torch.Tensor]] = [[] for _ in edits]
    masks: list[list[torch.Tensor]] = [[] for _ in edits]
    # per edit: the previous edited clip's final last-frame latent and decoded last frame
    prev: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(edits)
    source_kv: SourceKV | None = None
    train_kv: SourceKV | None = None
    edit_kv: list[EditKV | None] = [None] * len(edits)
    stored = 0
    for i, (a, b) in enumerate(ranges):
        if should_stop is not None and should_stop():
            raise I2VEditError(
                f"interrupted before clip {i + 1} of {len(ranges)}; finished clips are in the reuse folder."
            )
        src = frames[a:b]
        perturbed, _ = timer.stage(
            "sarp",
            i,
            sarp,
            src,
            derived_seed(settings.seed, i, SEED_SARP),
            settings.sarp_noise,
            settings.sarp_threshold,
        )
        g = generator(settings.seed, i, SEED_ENCODE)
        inv = _load_inversion(reuse, i, fingerprint) if reuse is not None else None
        if inv is None:
            latents, src_cond = timer.stage(
                "encode", i, encode_source, host, perturbed, g, settings.inversion_fps_id
            )
            kv_in = source_kv if (i > 0 and settings.skip_interval) else None
            inv = timer.stage("invert", i, invert, host, latents, src_cond, settings.steps, settings.mode,
                              capture_kv=cache_kv and i == 0, kv_source=kv_in,
                              callback=_tagged(step_callback, i, "invert"))  # fmt: skip
            if reuse is not None:
                save_inversion(reuse.clip_dir(i) / "inversion.safetensors", inv)
        elif i > 0 and settings.skip_interval:
            inv.kv_source = source_kv
        stored += inv.stored_bytes()
        # an inversion read back from the reuse folder holds no captures: replay them (exact, slower)
        mode = settings.mode if inv.captures is not None else "recompute"
        if i == 0 and settings.skip_interval:
            source_kv = SourceKV(host, inv)
        lora_host = host
        if i == 0:
            perturbed0 = perturbed
        if settings.lora_steps > 0:
            weights = None
            if reuse is not None and reuse.has(i, "lora.safetensors"):
                weights = load_lora(reuse.clip_dir(i) / "lora.safetensors")
            if weights is None:
                if i > 0 and settings.skip_interval and train_kv is None:
                    train_kv = source_kv
                    if train_hw != (height, width):
                        train_kv = SourceKV(
                            host,
                            _train_res_inversion(host, perturbed0, train_hw, settings, timer, step_callback),
                        )
                weights = timer.stage("lora", i, _train_lora, host, perturbed, inv, train_hw, (height, width),
                                      settings, i, train_kv if i > 0 else None, should_stop, step_callback)  # fmt: skip
                if reuse is not None:
                    save_lora(reuse.clip_dir(i) / "lora.safetensors", weights)
            lora_host = host.with_lora(weights)
        for e in range(len(edits)):
            name = f"edit_{e:02d}.safetensors"
            if reuse is not None and reuse.has(i, name):
                t, _ = reuse.load(i, name)
                cond = cond_from("cond", t)
                final, decoded, mask = t["latents"], t["frames"], t["masks"]
                clip = MatchedClip(lora_host, inv, cond, settings.match, settings.cfg, mode, host,
                                   edit_kv[e] if i > 0 and settings.skip_interval else None)  # fmt: skip
                trajectory = t["trajectory"]
            else:
                cond = timer.stage("condition", i, edit_conditioning, host, edits[e], denoise_ids,
                                   generator(settings.seed, i, SEED_CONDITION, e), prev[e])  # fmt: skip
                clip = MatchedClip(lora_host, inv, cond, settings.match, settings.cfg, mode, host,
                                   edit_kv[e] if i > 0 and settings.skip_interval else None)  # fmt: skip
                result = timer.stage("denoise", i, clip.run, capture_kv=cache_kv and i == 0,
                                     callback=_tagged(step_callback, i, "denoise"))  # fmt: skip
                final, trajectory = result.latents, result.trajectory
                mask = (
                    result.frame_masks(height, width)
                    if result.masks is not None
                    else torch.zeros(b - a, height, width)
                )
                decoded = timer.stage(
                    "decode", i, host.vae_decode, final / LATENT_SCALE, settings.decode_chunk
                )
                if reuse is not None:
                    reuse.save(i, name, {"latents": final, "trajectory": trajectory, "frames": decoded, "masks": mask,
                                         **cond_tensors("cond", cond)})  # fmt: skip
                if i == 0 and settings.skip_interval and cache_kv:
                    edit_kv[e] = EditKV(clip, result)
            if i == 0 and settings.skip_interval and edit_kv[e] is None:
                edit_kv[e] = EditKV(clip, MatchedResult(final, trajectory, None))
            if i == 0 and settings.skip_interval:
                stored += edit_kv[e].stored_bytes() if edit_kv[e] is not None else 0
            prev[e] = (final[-1:], decoded[-1:])
            outputs[e].append(decoded)
            masks[e].append(mask)
    videos = [C.stitch_clips(parts, settings.overlap) for parts in outputs]
    mask_videos = [C.stitch_clips(parts, settings.overlap) for parts in masks]
    report = {
        "frames": n, "clips": len(ranges), "clip_ranges": ranges, "edits": len(edits), "size": [height, width],
        "train_size": list(train_hw), "seconds": timer.seconds, "calls": timer.counts, "stored_bytes": stored,
    }  # fmt: skip
    return EditResult(videos, mask_videos, report)


def _train_res_inversion(
    host, perturbed, hw, settings: EditSettings, timer: _Timer, step_callback
) -> Inversion:
    """The first clip inverted again at training resolution, for later clips' training K/V."""
    small = C.resize_frames(perturbed, *hw)
    g = generator(settings.seed, 0, SEED_TRAIN_RES)
    latents, cond = encode_source(host, small, g, settings.inversion_fps_id)
    return timer.stage("invert_train_res", 0, invert, host, latents, cond, settings.steps,
                       callback=_tagged(step_callback, 0, "invert_train_res"))  # fmt: skip


def _train_lora(
    host, perturbed, inv, train_hw, gen_hw, settings: EditSettings, i, kv, should_stop, step_callback
):
    if train_hw == tuple(gen_hw):
        latents, first_raw = inv.latents[0], inv.latents[0][:1] / LATENT_SCALE
        clip_embed = inv.cond.clip_embed
    else:
        small = C.resize_frames(perturbed, *train_hw)
        g = generator(settings.seed, i, SEED_TRAIN_ENCODE)
        latents, cond = encode_source(host, small, g, settings.inversion_fps_id)
        first_raw, clip_embed = latents[:1] / LATENT_SCALE, cond.clip_embed
    config = TrainConfig(rank=settings.lora_rank, steps=settings.lora_steps, lr=settings.lora_lr,
                         target_set=settings.lora_target_set, seed=derived_seed(settings.seed, i, SEED_TRAIN) % 2**31)  # fmt: skip
    result = train_clip_lora(host, latents, first_raw, clip_embed, config, i, kv, should_stop=should_stop,
                             callback=_tagged(step_callback, i, "lora"))  # fmt: skip
    if result.interrupted:
        raise I2VEditError(f"interrupted while training the LoRA of clip {i + 1}; finished clips are kept.")
    return result.weights


def _tagged(callback: Progress | None, clip: int, stage: str) -> Progress | None:
    """A step callback that also says which clip and stage the step belongs to."""
    if callback is None:
        return None
    return lambda info: callback({**info, "clip": clip, "stage": stage})


def _load_inversion(reuse: ReuseFolder, i: int, fingerprint: str) -> Inversion | None:
    if not reuse.has(i, "inversion.safetensors"):
        return None
    inv, _ = load_inversion(reuse.clip_dir(i) / "inversion.safetensors")
    inv.fingerprint = fingerprint  # the manifest already proved the model
    return inv


def edit_frames(
    host: SVDHost,
    frames: torch.Tensor,
    fps: float,
    edits: list[torch.Tensor],
    settings: EditSettings = EditSettings(),
    size: tuple[int, int] | None = None,
    resize_mode: C.ResizeMode = "pad",
    **kw: Any,
) -> EditResult:
    """``edit_video`` for frames of any size: resize/pad to ``size`` (default: fit within 1024) and back.

    An edited frame of another size than the video is resized to it, with a logged warning.
    """
    _, h, w, _ = frames.shape
    size = size or C.fit_size(h, w)
    plan = C.make_resize_plan(h, w, *size, mode=resize_mode)
    fitted = []
    for e, img in enumerate(edits):
        if img.ndim == 3:
            img = img.unsqueeze(0)
        if tuple(img.shape[1:3]) != (h, w):
            log.warning("edited frame %d is %dx%d, the video %dx%d: resizing it to the video's size",
                        e, img.shape[1], img.shape[2], h, w)  # fmt: skip
            img = C.resize_frames(img[..., :3], h, w)
        fitted.append(plan.apply(img[..., :3]))
    result = edit_video(host, plan.apply(frames), fps, fitted, settings, **kw)
    result.videos = [plan.invert(v) for v in result.videos]
    result.masks = [plan.invert(m.unsqueeze(-1))[..., 0] for m in result.masks]
    result.report["source_size"] = [h, w]
    result.report["settings"] = asdict(settings)
    return result
