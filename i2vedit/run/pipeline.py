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
import math
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import I2VEditError
from ..host import SVDHost
from ..io import frames as C
from ..io.files import save_safetensors_atomic, writable_folder, write_text_atomic
from ..lora.file import LoRAWeights, load_lora, save_lora
from ..lora.train import TrainConfig, latest_checkpoint, training_size
from ..method.controller import MatchConfig
from ..method.inversion import Inversion, MemoryMode, check_mode, invert
from ..method.matching import EditKV, MatchedClip, MatchedResult, SourceKV
from ..method.sarp import sarp
from ..svd import LATENT_SCALE
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
LOCK = ".lock"
FORMAT = "i2vedit.pipeline/3"
EDIT_FORMAT = "i2vedit.edit/1"
LORA_CHECKPOINTS = "lora_checkpoints"
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
        }  # fmt: skip

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


def _pid_alive(pid: int) -> bool:
    try:
        import psutil  # in every ComfyUI install; optional on the command line

        return bool(psutil.pid_exists(pid))
    except ImportError:
        pass
    if os.name == "nt":
        return True  # cannot tell without psutil: treat the lock as held
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ReuseFolder:
    """A folder holding per-clip inversions, LoRAs and edits of one video and model, with a manifest.

    Inversions and LoRAs are shared by every edit of the video (their settings are in the manifest);
    each stored edit is keyed by a digest of everything that shapes it (``edit_key`` / ``chain_key``),
    so edits of one source coexist. Every file records its clip and frame range, checked on load; a
    file that cannot be read is recomputed (with a warning), one of another clip is refused. One run
    at a time: a lock file keeps a second run out.
    """

    def __init__(self, path: str | Path, identity: dict[str, Any]) -> None:
        self.path = writable_folder(path, "reuse folder")
        self.identity = identity
        self.warnings: list[str] = []
        self._lock: Path | None = self._acquire()
        try:
            self._check_manifest()
        except BaseException:
            self.release()
            raise

    def _acquire(self) -> Path:
        lock = self.path / LOCK
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._lock_holder(lock)
                if holder is not None and holder.get("host") == socket.gethostname():
                    pid = int(holder.get("pid", -1))
                    if pid > 0 and not _pid_alive(pid):
                        self.warn(
                            f"{lock} was left by process {pid}, which has ended; taking the folder over."
                        )
                        lock.unlink(missing_ok=True)
                        continue
                who = (
                    f"process {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}"
                    if holder is not None
                    else "a run whose lock file cannot be read"
                )
                raise I2VEditError(
                    f"the reuse folder {self.path} is in use by another run ({who}); wait for it to finish or "
                    f"give another reuse folder. If no other run is using it, delete {lock}."
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)  # fmt: skip
            return lock
        raise I2VEditError(f"could not lock the reuse folder {self.path}; another run took it. Try again.")

    @staticmethod
    def _lock_holder(lock: Path) -> dict[str, Any] | None:
        try:
            holder = json.loads(lock.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def release(self) -> None:
        """Give the folder back to other runs (idempotent)."""
        if self._lock is not None:
            self._lock.unlink(missing_ok=True)
            self._lock = None

    def __enter__(self) -> ReuseFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _check_manifest(self) -> None:
        manifest = self.path / MANIFEST
        if not manifest.exists():
            write_text_atomic(manifest, json.dumps(self.identity, indent=1))
            return
        try:
            old = json.loads(manifest.read_text())
        except (OSError, ValueError) as e:
            raise I2VEditError(f"{manifest} is unreadable ({e}); delete the folder or choose another.") from e
        for key in ("format", "video", "model", "settings"):
            if old.get(key) != self.identity.get(key):
                raise I2VEditError(
                    f"the reuse folder {self.path} belongs to another {key} ({old.get(key)!r}, this run has "
                    f"{self.identity.get(key)!r}); its inversions and LoRAs cannot be reused. Choose another folder."
                )

    def warn(self, message: str) -> None:
        log.warning("%s", message)
        self.warnings.append(message)

    def clip_dir(self, i: int) -> Path:
        d = self.path / f"clip_{i:03d}"
        d.mkdir(exist_ok=True)
        return d

    def file(self, i: int, name: str) -> Path:
        return self.path / f"clip_{i:03d}" / name

    def has(self, i: int, name: str) -> bool:
        return self.file(i, name).is_file()

    @staticmethod
    def clip_meta(i: int, span: tuple[int, int]) -> dict[str, str]:
        return {"pipeline.clip": str(i), "pipeline.frames": f"{span[0]},{span[1]}"}

    def check_clip(self, path: Path, meta: dict[str, str], i: int, span: tuple[int, int]) -> None:
        """Refuse a stored file made for another clip or frame range (a folder changed by hand)."""
        want = self.clip_meta(i, span)
        got = {k: meta.get(k) for k in want}
        if got != want:
            raise I2VEditError(
                f"{path} was made for clip {got['pipeline.clip']} (frames {got['pipeline.frames']}), but it "
                f"lies in the folder of clip {i} (frames {span[0]},{span[1]}): the reuse folder was changed "
                "by hand. Delete that file (it is recomputed) or the whole folder."
            )

    def load_tensors(self, i: int, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """A stored file's tensors and metadata; None (with a warning) when it cannot be read."""
        from safetensors import safe_open

        path = self.file(i, name)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            return load_file(str(path)), meta
        except (OSError, SafetensorError) as e:
            self.warn(f"{path} is damaged ({e}); recomputing it.")
            return None


def edit_key(edited: torch.Tensor, settings: EditSettings) -> str:
    """A digest of everything that shapes an edit's first clip beyond the folder's own identity."""
    h = hashlib.sha256(repr(tuple(edited.shape)).encode())
    h.update(edited.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    h.update(json.dumps(settings.edit_identity(), sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def chain_key(key: str, prev: tuple[torch.Tensor, torch.Tensor] | None) -> str:
    """The key of one clip of an edit: the edit's key and, after clip 0, what the clip continues from."""
    if prev is None:
        return key
    h = hashlib.sha256(key.encode())
    for t in prev:
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def video_clip_ranges(frames: int, settings: EditSettings) -> list[tuple[int, int]]:
    """The clips ``edit_video`` cuts a video of ``frames`` frames into (a shorter video: one clip)."""
    return C.clip_ranges(frames, min(settings.chunk, frames), settings.overlap) if frames > 1 else [(0, 1)]


def training_hw(height: int, width: int, settings: EditSettings) -> tuple[int, int]:
    """The size ``edit_video`` trains LoRAs at: ``settings.train_size``, else about 512×896, never above the video."""
    hw = settings.train_size or training_size(height, width)
    return (height, width) if hw[0] * hw[1] > height * width else (int(hw[0]), int(hw[1]))


def _check_inputs(frames: torch.Tensor, fps: float, edits: list[torch.Tensor]) -> tuple[int, int, int]:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise I2VEditError(f"frames must be an IMAGE batch (N, H, W, 3), got {tuple(frames.shape)}.")
    n, height, width, _ = frames.shape
    C.check_size(height, width)
    if not bool(torch.isfinite(frames).all()):
        raise I2VEditError("the video frames hold NaN or inf values; give frames in [0, 1].")
    if not edits:
        raise I2VEditError("give at least one edited first frame.")
    for e, img in enumerate(edits):
        if tuple(img.shape) != (1, height, width, 3):
            raise I2VEditError(
                f"edited frame {e} is {tuple(img.shape)}, the video is (1, {height}, {width}, 3); use edit_frames, "
                "which resizes it, or resize it to the video's size."
            )
        if not bool(torch.isfinite(img).all()):
            raise I2VEditError(f"edited frame {e} holds NaN or inf values; give an image in [0, 1].")
    if not (isinstance(fps, int | float) and math.isfinite(fps) and fps > 0):
        raise I2VEditError(f"frame rate must be a positive number, got {fps}.")
    return n, height, width


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
    training, denoising; it may raise to interrupt: finished clips, and the LoRA training so far,
    stay in the reuse folder); ``should_stop`` is polled between clips and training steps.
    """
    settings = settings.validate()
    n, height, width = _check_inputs(frames, fps, edits)
    fingerprint = host.fingerprint()
    ranges = video_clip_ranges(n, settings)
    if ranges[0][1] - ranges[0][0] < 2:
        raise I2VEditError("the video has a single frame; SVD needs at least 2 frames.")
    identity = {
        "format": FORMAT, "video": _digest(frames), "model": fingerprint, "settings": settings.identity(),
        "frames": n, "size": [height, width],
    }  # fmt: skip
    train_hw = training_hw(height, width, settings)
    C.check_size(*train_hw)
    keys = [edit_key(img, settings) for img in edits]
    reuse = ReuseFolder(reuse_dir, identity) if reuse_dir is not None else None
    try:
        run = _Run(host, frames, fps, edits, keys, settings, reuse, train_hw, ranges, progress, should_stop,
                   step_callback)  # fmt: skip
        for i in range(len(ranges)):
            run.clip(i)
    finally:
        if reuse is not None:
            reuse.release()
    videos = [C.stitch_clips(parts, settings.overlap) for parts in run.outputs]
    mask_videos = [C.stitch_clips(parts, settings.overlap) for parts in run.masks]
    report = {
        "frames": n, "clips": len(ranges), "clip_ranges": ranges, "edits": len(edits), "size": [height, width],
        "train_size": list(train_hw), "seconds": run.timer.seconds, "calls": run.timer.counts,
        "stored_bytes": run.stored, "edit_keys": keys, "warnings": reuse.warnings if reuse is not None else [],
    }  # fmt: skip
    return EditResult(videos, mask_videos, report)


class _Run:
    """One ``edit_video`` run: the state carried from clip to clip (chaining, skip-interval K/V)."""

    def __init__(self, host, frames, fps, edits, keys, settings: EditSettings, reuse: ReuseFolder | None,
                 train_hw, ranges, progress, should_stop, step_callback) -> None:  # fmt: skip
        self.host, self.frames, self.edits, self.keys, self.settings = host, frames, edits, keys, settings
        self.reuse, self.train_hw, self.ranges = reuse, train_hw, ranges
        self.should_stop, self.step_callback = should_stop, step_callback
        self.size = tuple(frames.shape[1:3])
        self.timer = _Timer(progress, len(ranges))
        self.denoise_ids = denoise_time_ids(fps)
        self.cache_kv = settings.mode == "cache" and settings.skip_interval
        self.outputs: list[list[torch.Tensor]] = [[] for _ in edits]
        self.masks: list[list[torch.Tensor]] = [[] for _ in edits]
        # per edit: the previous edited clip's final last-frame latent and decoded last frame
        self.prev: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(edits)
        self.source_kv: SourceKV | None = None
        self.train_kv: SourceKV | None = None
        self.edit_kv: list[EditKV | None] = [None] * len(edits)
        self.perturbed0: torch.Tensor | None = None
        self.stored = 0

    def clip(self, i: int) -> None:
        s, timer, reuse = self.settings, self.timer, self.reuse
        a, b = self.ranges[i]
        later = i > 0 and s.skip_interval
        if self.should_stop is not None and self.should_stop():
            raise I2VEditError(
                f"interrupted before clip {i + 1} of {len(self.ranges)}; finished clips are in the reuse folder."
            )
        perturbed, _ = timer.stage("sarp", i, sarp, self.frames[a:b], derived_seed(s.seed, i, SEED_SARP),
                                   s.sarp_noise, s.sarp_threshold)  # fmt: skip
        if i == 0:
            self.perturbed0 = perturbed
        inv = self._stored_inversion(i, (a, b))
        if inv is None:
            g = generator(s.seed, i, SEED_ENCODE)
            latents, src_cond = timer.stage(
                "encode", i, encode_source, self.host, perturbed, g, s.inversion_fps_id
            )
            inv = timer.stage("invert", i, invert, self.host, latents, src_cond, s.steps, s.mode,
                              capture_kv=self.cache_kv and i == 0, kv_source=self.source_kv if later else None,
                              callback=_tagged(self.step_callback, i, "invert"))  # fmt: skip
            if reuse is not None:
                save_inversion(reuse.clip_dir(i) / "inversion.safetensors", inv, reuse.clip_meta(i, (a, b)))
        elif later:
            inv.kv_source = self.source_kv
        self.stored += inv.stored_bytes()
        # an inversion read back from the reuse folder holds no captures: replay them (exact, slower)
        mode = s.mode if inv.captures is not None else "recompute"
        if i == 0 and s.skip_interval:
            self.source_kv = SourceKV(self.host, inv)
        lora_host = self.host
        if s.lora_steps > 0:
            weights = self._stored_lora(i, (a, b))
            if weights is None:
                weights = self._train(i, (a, b), perturbed, inv)
            lora_host = self.host.with_lora(weights)
        for e in range(len(self.edits)):
            self._edit(i, (a, b), e, inv, lora_host, mode)

    def _stored_inversion(self, i: int, span: tuple[int, int]) -> Inversion | None:
        reuse = self.reuse
        if reuse is None or not reuse.has(i, "inversion.safetensors"):
            return None
        path = reuse.file(i, "inversion.safetensors")
        try:
            inv, meta = load_inversion(path)
        except I2VEditError as e:
            reuse.warn(f"{path} cannot be used ({e}); recomputing it.")
            return None
        reuse.check_clip(path, meta, i, span)
        inv.fingerprint = reuse.identity["model"]  # the manifest already proved the model
        return inv

    def _stored_lora(self, i: int, span: tuple[int, int]) -> LoRAWeights | None:
        reuse = self.reuse
        if reuse is None or not reuse.has(i, "lora.safetensors"):
            return None
        path = reuse.file(i, "lora.safetensors")
        try:
            weights = load_lora(path)
        except I2VEditError as e:
            reuse.warn(f"{path} cannot be used ({e}); training it again.")
            return None
        reuse.check_clip(path, weights.extra_metadata, i, span)
        return weights

    def _train(self, i: int, span: tuple[int, int], perturbed: torch.Tensor, inv: Inversion) -> LoRAWeights:
        s, reuse = self.settings, self.reuse
        if i > 0 and s.skip_interval and self.train_kv is None:
            self.train_kv = self.source_kv
            if self.train_hw != self.size:
                assert self.perturbed0 is not None
                self.train_kv = SourceKV(self.host, _train_res_inversion(
                    self.host, self.perturbed0, self.train_hw, s, self.timer, self.step_callback))  # fmt: skip
        ckpt_dir, resume = None, None
        if reuse is not None:
            ckpt_dir = reuse.clip_dir(i) / LORA_CHECKPOINTS
            ckpt_dir.mkdir(exist_ok=True)
            resume = latest_checkpoint(ckpt_dir)
            if resume is not None:
                try:
                    load_lora(resume)
                except I2VEditError as e:
                    reuse.warn(f"the LoRA checkpoint {resume} cannot be used ({e}); training from step 0.")
                    shutil.rmtree(ckpt_dir, ignore_errors=True)
                    ckpt_dir.mkdir()
                    resume = None
        weights = self.timer.stage("lora", i, _train_lora, self.host, perturbed, inv, self.train_hw, self.size, s,
                                   i, self.train_kv if i > 0 else None, self.should_stop, self.step_callback,
                                   ckpt_dir, resume)  # fmt: skip
        if reuse is not None:
            meta = {**weights.extra_metadata, **reuse.clip_meta(i, span)}
            weights = replace(weights, extra_metadata=meta)
            save_lora(reuse.clip_dir(i) / "lora.safetensors", weights)
            shutil.rmtree(ckpt_dir, ignore_errors=True)  # type: ignore[arg-type]
        return weights

    def _edit(
        self, i: int, span: tuple[int, int], e: int, inv: Inversion, lora_host: SVDHost, mode: MemoryMode
    ) -> None:
        s, reuse, timer = self.settings, self.reuse, self.timer
        later = i > 0 and s.skip_interval
        key = chain_key(self.keys[e], self.prev[e])
        name = f"edit_{key}.safetensors"
        stored = reuse.load_tensors(i, name) if reuse is not None and reuse.has(i, name) else None
        if stored is not None:
            assert reuse is not None
            t, meta = stored
            reuse.check_clip(reuse.file(i, name), meta, i, span)
            cond = cond_from("cond", t)
            final, trajectory, decoded, mask = t["latents"], t["trajectory"], t["frames"], t["masks"]
            clip = MatchedClip(lora_host, inv, cond, s.match, s.cfg, mode, self.host,
                               self.edit_kv[e] if later else None)  # fmt: skip
        else:
            cond = timer.stage("condition", i, edit_conditioning, self.host, self.edits[e], self.denoise_ids,
                               generator(s.seed, i, SEED_CONDITION, e), self.prev[e])  # fmt: skip
            clip = MatchedClip(lora_host, inv, cond, s.match, s.cfg, mode, self.host,
                               self.edit_kv[e] if later else None)  # fmt: skip
            result = timer.stage("denoise", i, clip.run, capture_kv=self.cache_kv and i == 0,
                                 callback=_tagged(self.step_callback, i, "denoise"))  # fmt: skip
            final, trajectory = result.latents, result.trajectory
            h, w = self.size
            mask = (
                result.frame_masks(h, w) if result.masks is not None else torch.zeros(span[1] - span[0], h, w)
            )
            decoded = timer.stage("decode", i, self.host.vae_decode, final / LATENT_SCALE, s.decode_chunk)
            if reuse is not None:
                meta = {
                    "format": EDIT_FORMAT,
                    "edit_key": self.keys[e],
                    "chain_key": key,
                    **reuse.clip_meta(i, span),
                }
                save_safetensors_atomic(reuse.clip_dir(i) / name, {"latents": final, "trajectory": trajectory,
                                        "frames": decoded, "masks": mask, **cond_tensors("cond", cond)}, meta)  # fmt: skip
            if i == 0 and self.cache_kv:
                self.edit_kv[e] = EditKV(clip, result)
        if i == 0 and s.skip_interval:
            if self.edit_kv[e] is None:
                self.edit_kv[e] = EditKV(clip, MatchedResult(final, trajectory, None))
            self.stored += self.edit_kv[e].stored_bytes()  # type: ignore[union-attr]
        self.prev[e] = (final[-1:], decoded[-1:])
        self.outputs[e].append(decoded)
        self.masks[e].append(mask)


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
    host, perturbed, inv, train_hw, gen_hw, settings: EditSettings, i, kv, should_stop, step_callback,
    checkpoint_dir=None, resume_from=None,
):  # fmt: skip
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
                             callback=_tagged(step_callback, i, "lora"), checkpoint_dir=checkpoint_dir,
                             resume_from=resume_from)  # fmt: skip
    if result.interrupted:
        raise I2VEditError(
            f"interrupted while training the LoRA of clip {i + 1}; finished clips"
            + (" and the training so far are kept" if checkpoint_dir is not None else " are kept")
            + "."
        )
    return result.weights


def _tagged(callback: Progress | None, clip: int, stage: str) -> Progress | None:
    """A step callback that also says which clip and stage the step belongs to."""
    if callback is None:
        return None
    return lambda info: callback({**info, "clip": clip, "stage": stage})


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
