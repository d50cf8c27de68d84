"""``python -m i2vedit edit|demo|bench``: the headless entry points (diffusers host)."""

from __future__ import annotations

import argparse
import errno
import functools
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import I2VEditError, ModelFileError
from .io.files import atomic_write, writable_folder, write_text_atomic
from .io.synthetic import DEMO_FRAMES, DEMO_SIZE, demo_video
from .method.controller import PRESETS, MatchConfig
from .method.inversion import MEMORY_MODES
from .precision import DTYPES, resolve_dtypes, resolve_weights_dtype
from .run.pipeline import MAX_CFG, MAX_CHUNK, EditSettings

if TYPE_CHECKING:
    from .io.video import Video, VideoSource

SVD_NATIVE_SIZE = (576, 1024)
MAX_SIDE = 2048  # each side of --size; SVD was trained at 576×1024
MAX_CLIP_PIXELS = 14 * 1152 * 2048  # frames per clip × height × width: SVD's 14 frames at twice its size
MAX_NAME_BYTES = 200  # output file names are cut to this (plus a number and .mp4) to stay under 255
INTERRUPTED = 130  # exit code after Ctrl-C, as shells use
DTYPE = torch.float32  # the command line's models compute in float32 (weights stored per --weights-dtype)


def peak_memory_bytes() -> int | None:
    """This process's peak resident memory in bytes, or None where the OS does not say.

    ``ru_maxrss`` is KiB on Linux and bytes on macOS; Windows has no ``resource`` module and uses
    psutil's peak working set when psutil is installed.
    """
    if sys.platform == "win32":
        try:
            import psutil
        except ImportError:
            return None
        return int(psutil.Process().memory_info().peak_wset)
    try:
        import resource
    except ImportError:
        return None
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024


def comparison_image(
    source: torch.Tensor,
    edited: torch.Tensor,
    masks: torch.Tensor,
    columns: int = 5,
    region: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows: source, edited, difference masks (and the region lock's mask), for ``columns`` frames spread
    over the video."""
    idx = torch.linspace(0, source.shape[0] - 1, min(columns, source.shape[0])).round().long()
    rows = [
        torch.cat(list(source[idx]), 1),
        torch.cat(list(edited[idx]), 1),
        *(
            torch.cat(list(m[idx, ..., None].expand(-1, -1, -1, 3)), 1)
            for m in (masks, region)
            if m is not None
        ),
    ]
    return torch.cat(rows, 0)


def mask_frames(masks: torch.Tensor, region: torch.Tensor | None) -> torch.Tensor:
    """The ``*_masks.mp4`` frames: the difference masks, and the region lock's mask beside them, in grey."""
    both = masks if region is None else torch.cat([masks, region.to(masks.dtype)], 2)
    return both[..., None].expand(-1, -1, -1, 3).clamp(0, 1)


def _save_png(path: Path, image: torch.Tensor) -> None:
    import cv2

    bgr = cv2.cvtColor((image.clamp(0, 1) * 255).round().to(torch.uint8).numpy(), cv2.COLOR_RGB2BGR)

    def write(tmp: Path) -> None:
        if not cv2.imwrite(str(tmp), bgr):
            raise OSError(f"OpenCV could not write the PNG {tmp.name}")

    atomic_write(path, write, "image")


def _export_loras(reuse: Path, out: Path) -> list[str]:
    names = []
    for clip_dir in sorted(reuse.glob("clip_*")):
        lora = clip_dir / "lora.safetensors"
        if lora.is_file():
            target = out / f"motion_lora_{clip_dir.name}.safetensors"
            atomic_write(target, functools.partial(shutil.copyfile, lora), "LoRA")
            names.append(target.name)
    return names


DEMO_FPS = 8.0  # the demo's frame rate; a --video is sampled at this rate, or its own where that is lower


def demo_clip(video: str | Path | None) -> tuple[Video, torch.Tensor]:
    """The demo's source (frames, rate, audio) and edited first frame: the synthetic square, or the first
    ``DEMO_FRAMES`` frames of ``video`` at ``DEMO_FPS`` and a small size, its first frame recoloured."""
    from .io.frames import fit_size
    from .io.video import Video, as_fraction, probe_video, read_video_clip

    if video is None:
        source, edited = demo_video()
        return Video(source, as_fraction(DEMO_FPS)), edited
    _check_input_file(str(video), "video", "a video file (mp4, mov, ...)")
    info = probe_video(video)
    size = fit_size(info.height, info.width, max(DEMO_SIZE))
    sample_fps = DEMO_FPS if info.fps > DEMO_FPS else -1.0
    clip = read_video_clip(video, sample_fps=sample_fps, max_frames=DEMO_FRAMES, size=size)
    return clip, clip.frames[:1, ..., [2, 1, 0]].clone()  # red and blue swapped: a visible, simple edit


def run_demo(out: str | Path, progress: bool = True, video: str | Path | None = None) -> dict[str, Any]:
    """Every stage on a tiny random SVD: no downloads. Writes videos, comparison, LoRAs and a report.

    ``video``: a few frames of this file at a small size instead of the synthetic clip (its audio is
    carried over to the outputs)."""
    from .hosts.diffusers.tiny import build_tiny_diffusers_host, sharpen_self_attention
    from .io.video import write_video
    from .run.pipeline import EditSettings, edit_frames

    out_dir = writable_folder(out)
    t0 = time.perf_counter()
    clip, edited = demo_clip(video)
    torch.manual_seed(0)
    host = sharpen_self_attention(build_tiny_diffusers_host(seed=0))
    source, fps = clip.frames, clip.fps
    settings = EditSettings(chunk=6, overlap=1, steps=12, lora_steps=10, lora_rank=8, lora_lr=1e-3, seed=0)

    def show(info: dict[str, Any]) -> None:
        if progress:
            eta = "" if info["eta"] is None else f", about {info['eta']:.0f} s left"
            print(f"[demo] clip {info['clip'] + 1}/{info['clips']}: {info['stage']}{eta}", file=sys.stderr)

    reuse = out_dir / "reuse"
    size = (int(source.shape[1]), int(source.shape[2])) if video is not None else DEMO_SIZE
    result = edit_frames(
        host, source, float(fps), [edited], settings, size=size, reuse_dir=reuse, progress=show
    )
    write_video(out_dir / "source.mp4", source, fps, clip.audio)
    write_video(out_dir / "edited.mp4", result.videos[0], fps, clip.audio)
    _save_png(out_dir / "comparison.png", comparison_image(source, result.videos[0], result.masks[0]))
    loras = _export_loras(reuse, out_dir)
    report = {
        "note": "tiny random-weight SVD: this proves the install and runs every stage; it makes no meaningful edit",
        "source": str(video) if video is not None else "synthetic",
        "fps": str(fps),
        "audio": clip.audio is not None,
        "frames": result.report["frames"],
        "clips": result.report["clips"],
        "clip_ranges": result.report["clip_ranges"],
        "size": result.report["size"],
        "seconds_per_stage": result.report["seconds"],
        "stage_calls": result.report["calls"],
        "seconds_total": time.perf_counter() - t0,
        "peak_memory_bytes": peak_memory_bytes(),
        "stored_bytes": result.report["stored_bytes"],
        "loras": loras,
        "outputs": ["source.mp4", "edited.mp4", "comparison.png", "report.json"],
    }
    write_text_atomic(out_dir / "report.json", json.dumps(report, indent=2), "report")
    return report


_DOWNLOAD_HINT = (
    "the folder looks damaged or incomplete (an interrupted download or copy?): download it again, e.g. "
    "huggingface-cli download stabilityai/stable-video-diffusion-img2vid --local-dir DIR, or point --model "
    "at another SVD folder or at svd.safetensors"
)
# subfolder: (what it holds, the config field naming its class, the classes SVD uses, weight file names)
_DIFFUSERS_PARTS = {
    "unet": ("UNet", "_class_name", ("UNetSpatioTemporalConditionModel",), "diffusion_pytorch_model"),
    "vae": ("VAE", "_class_name", ("AutoencoderKLTemporalDecoder",), "diffusion_pytorch_model"),
    "image_encoder": ("image encoder", "architectures", ("CLIPVisionModelWithProjection",), "model"),
}


def _check_diffusers_folder(p: Path) -> None:
    """Read each part's config and weight header (no weights): a damaged or foreign folder is named now,
    not as a traceback once the video has been read."""
    from safetensors import SafetensorError, safe_open

    for sub, (what, field, classes, weights) in _DIFFUSERS_PARTS.items():
        config = p / sub / "config.json"
        try:
            cfg = json.loads(config.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelFileError(f"{config} is missing; {_DOWNLOAD_HINT}.") from None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ModelFileError(f"{config} is not a readable JSON config ({e}); {_DOWNLOAD_HINT}.") from None
        if not isinstance(cfg, dict):
            raise ModelFileError(f"{config} is not a JSON object; {_DOWNLOAD_HINT}.")
        found = cfg.get(field)
        names = found if isinstance(found, list) else [found]
        if found is not None and not any(n in classes for n in names):
            raise ModelFileError(
                f"{p / sub} holds a {', '.join(map(str, names))}, not SVD's {classes[0]}: {p} is not a Stable "
                "Video Diffusion img2vid folder. Point --model at an SVD folder (unet/, vae/, image_encoder/ "
                "as stabilityai/stable-video-diffusion-img2vid has them) or at svd.safetensors."
            )
        single, index = p / sub / f"{weights}.safetensors", p / sub / f"{weights}.safetensors.index.json"
        if index.is_file() and not single.is_file():
            continue  # sharded: checked when loading
        if not single.is_file():
            others = sorted(f.name for f in (p / sub).glob("*.safetensors"))
            held = f" (it holds {', '.join(others)}; full-precision files are needed)" if others else ""
            raise ModelFileError(f"{single} is missing{held}; {_DOWNLOAD_HINT}.")
        try:
            with safe_open(str(single), framework="pt") as f:
                f.keys()
        except (OSError, SafetensorError) as e:
            raise ModelFileError(
                f"the {what} weights {single} cannot be read ({e}); {_DOWNLOAD_HINT}."
            ) from None


def check_model_path(model: str | Path) -> Path:
    """Refuse, before any work, a model path the command line cannot load."""
    p = Path(model)
    if _stat(str(model), "model") is None:
        raise I2VEditError(
            f"no model at {p}; check the path. Give a diffusers SVD folder (unet/, vae/, image_encoder/) or "
            "a single-file svd.safetensors / svd_xt.safetensors."
        )
    if p.is_file():
        if p.suffix.lower() != ".safetensors":
            raise I2VEditError(
                f"{p} is a single file but not .safetensors; the command line reads an SGM single-file SVD "
                "checkpoint (svd.safetensors / svd_xt.safetensors) or a diffusers SVD folder (unet/, vae/, "
                "image_encoder/). Pickle checkpoints (.ckpt, .pt) are not loaded, because unpickling can run code."
            )
        from .hosts.diffusers.single_file import check_single_file

        return check_single_file(p)
    missing = [s for s in ("unet", "vae", "image_encoder") if not (p / s).is_dir()]
    if missing:
        raise I2VEditError(
            f"{p} is not a diffusers SVD folder: it lacks {', '.join(missing)}/. Give such a folder or a "
            "single-file svd.safetensors / svd_xt.safetensors."
        )
    _check_diffusers_folder(p)
    return p


def load_diffusers_host(
    model: str | Path, dtype: torch.dtype = torch.float32, weights_dtype: torch.dtype = torch.float32
):
    """SVD from a diffusers folder (unet/, vae/, image_encoder/ as on the Hub) or an SGM single file
    (``svd.safetensors`` / ``svd_xt.safetensors``), loaded from disk only; its weights stored in
    ``weights_dtype`` (``store_weights``) before they move to the GPU."""
    p = check_model_path(model)
    if p.is_file():
        from .hosts.diffusers.single_file import load_single_file

        return load_single_file(p, dtype=dtype, weights_dtype=weights_dtype)
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from safetensors import SafetensorError
    from transformers import CLIPVisionModelWithProjection

    from .hosts.diffusers.host import DiffusersSVDHost, store_weights

    kw = {"local_files_only": True, "use_safetensors": True}
    parts = {}
    for sub, cls in (
        ("unet", UNetSpatioTemporalConditionModel),
        ("vae", AutoencoderKLTemporalDecoder),
        ("image_encoder", CLIPVisionModelWithProjection),
    ):
        try:
            parts[sub] = cls.from_pretrained(p, subfolder=sub, **kw)
        except (OSError, ValueError, TypeError, KeyError, RuntimeError, SafetensorError) as e:
            if isinstance(e, RuntimeError) and "memory" in str(e).lower():
                raise  # out of memory: not a damaged folder
            reason = (str(e).strip().splitlines() or [""])[0].split(" If you want", 1)[0][:300]
            raise ModelFileError(
                f"could not load the {_DIFFUSERS_PARTS[sub][0]} from {p / sub} ({type(e).__name__}: {reason}); "
                f"{_DOWNLOAD_HINT}."
            ) from e
    device = model_device()
    unet, vae, clip = (store_weights(parts[sub], weights_dtype) for sub in ("unet", "vae", "image_encoder"))
    return DiffusersSVDHost(unet.to(device, dtype), vae.to(device), clip.to(device), dtype=dtype,
                            weights_dtype=weights_dtype)  # fmt: skip


def model_device() -> torch.device:
    """Where the command line puts the model: the GPU when torch sees one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _stat(path: str, what: str) -> os.stat_result | None:
    """``os.stat`` of a path given on the command line, None when nothing is there."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            longest = max(len(part) for part in Path(path).parts)
            raise I2VEditError(
                f"cannot read the {what} {path}: a name in it is {longest} characters, longer than the "
                "filesystem allows (usually 255 bytes); check the path or rename the file."
            ) from None
        raise I2VEditError(
            f"cannot read the {what} {path} ({e}); check the path and its permissions."
        ) from None


def _check_input_file(path: str, what: str, give: str) -> None:
    import stat

    st = _stat(path, what)
    if st is None:
        raise I2VEditError(f"no {what} at {path}; check the path.")
    if stat.S_ISDIR(st.st_mode):
        raise I2VEditError(f"the {what} {path} is a folder; give {give}.")
    if st.st_size == 0:
        raise I2VEditError(f"the {what} {path} is empty (0 bytes); give {give}.")


def _png_is_empty(head: bytes) -> bool:
    """A PNG whose header says 0 pixels wide or high (OpenCV and PIL only say they cannot read it)."""
    if not head.startswith(b"\x89PNG\r\n\x1a\n") or head[12:16] != b"IHDR":
        return False
    return int.from_bytes(head[16:20], "big") == 0 or int.from_bytes(head[20:24], "big") == 0


def _read_image(path: str) -> torch.Tensor:
    """An edited first frame as a (1, H, W, 3) IMAGE; a file that does not decode completely is refused."""
    import cv2
    from PIL import Image, ImageFile, UnidentifiedImageError

    give = "a PNG or JPEG file"
    _check_input_file(path, "image", give)
    with open(path, "rb") as f:
        head = f.read(24)
    if _png_is_empty(head):
        raise I2VEditError(
            f"the image {path} is 0×0 pixels; give an edited first frame with pixels ({give})."
        )
    truncated_ok, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with Image.open(path) as im:
            if 0 in im.size:
                raise I2VEditError(
                    f"the image {path} is {im.size[0]}×{im.size[1]} pixels; give {give} with pixels."
                )
            im.load()  # decodes everything: raises on a truncated file
    except UnidentifiedImageError:
        raise I2VEditError(f"cannot read the image {path}: it is not an image file; give {give}.") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise I2VEditError(
            f"the image {path} is truncated or damaged ({e}): it does not decode completely. Save or copy it "
            "again and give the whole file."
        ) from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise I2VEditError(f"cannot read the image {path}; give {give}.")
    return torch.from_numpy(cv2.cvtColor(img, cv2.COLOR_BGR2RGB)).float().div(255).unsqueeze(0)


def _read_region(path: str, frames: int, height: int, width: int) -> torch.Tensor:
    """``--region-lock PATH``: a mask image (white = the edit may act), for every frame, checked now."""
    import cv2

    from .method.region import check_region

    give = "a black-and-white PNG of the video's size (white where the edit may act)"
    _check_input_file(path, "region mask", give)
    img = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise I2VEditError(f"cannot read the region mask {path}; give {give}.")
    return check_region(torch.from_numpy(img).float().div(255), frames, height, width)


def output_names(first_frames: list[str]) -> list[str]:
    """One distinct ``<name>.mp4`` per edited first frame: its file name's stem, ``_2``, ``_3`` … added to
    repeats (``a/edit.png`` and ``b/edit.png`` give ``edit.mp4`` and ``edit_2.mp4``), compared without case
    (macOS and Windows folders ignore it), cut to stay within the filesystem's name length."""
    stems = []
    for path in first_frames:
        stem = Path(path).stem.encode("utf-8")[:MAX_NAME_BYTES].decode("utf-8", "ignore") or "edit"
        stems.append(stem)
    natural = {s.lower() for s in stems}
    taken: set[str] = set()
    names = []
    for stem in stems:
        name, k = stem, 2
        while name.lower() in taken or (name != stem and name.lower() in natural):
            name, k = f"{stem}_{k}", k + 1
        taken.add(name.lower())
        names.append(f"{name}.mp4")
    return names


def check_generation_size(size: tuple[int, int], chunk: int) -> None:
    """Refuse, before reading anything, a generation size SVD cannot use or that would not fit in memory."""
    h, w = size
    native = f"{SVD_NATIVE_SIZE[0]} {SVD_NATIVE_SIZE[1]}"
    if h % 64 or w % 64 or not (64 <= h <= MAX_SIDE and 64 <= w <= MAX_SIDE):
        raise I2VEditError(
            f"--size {h} {w} is outside what SVD can generate: each side must be a multiple of 64 from 64 to "
            f"{MAX_SIDE}. SVD's native size is --size {native} (height width); leave --size out to fit the "
            "video within 1024."
        )
    if chunk * h * w > MAX_CLIP_PIXELS:
        raise I2VEditError(
            f"a clip of {chunk} frames at {h}×{w} is {chunk * h * w / 1e6:.0f} M pixels, over the "
            f"{MAX_CLIP_PIXELS / 1e6:.0f} M that fit in memory; use a smaller --size (SVD's native size is "
            f"--size {native}) or a shorter --chunk."
        )


def check_vram(args: argparse.Namespace, settings: EditSettings, frames: int, size: tuple[int, int]) -> None:
    """``--max-vram``: plan the run on the meta device (the model's configs, no weights, nothing computed;
    ``hosts.diffusers.plan``) and refuse it, naming the first stage over the budget, before any model loads."""
    if args.max_vram is None:
        return
    from .hosts.diffusers.plan import GB, model_meta_host, plan_edit
    from .run.pipeline import training_hw, video_clip_ranges

    ranges, (h, w) = video_clip_ranges(frames, settings), size
    plan_edit(
        h, w, max(end - start for start, end in ranges), settings.steps, settings.lora_steps, len(ranges),
        edits=len(args.first_frame), train_hw=training_hw(h, w, settings), match=settings.match,
        decode_chunk=settings.decode_chunk, lora_rank=settings.lora_rank, skip_interval=settings.skip_interval,
        host=model_meta_host(args.model, DTYPE, DTYPE), count_flops=False, max_bytes=args.max_vram * GB,
        low_memory=args.low_memory, weights_dtype=DTYPES[settings.weights_dtype],
    )  # fmt: skip


def _reuse_dir(args: argparse.Namespace) -> Path:
    return Path(args.reuse) if getattr(args, "reuse", None) else Path(args.out) / "reuse"


class _Outputs:
    """Each edit's video, masks video and contact sheet, written clip by clip as the run makes them (a
    ``ClipSink``): the run holds one clip, whatever the video's length."""

    def __init__(self, out_dir: Path, names: list[str], source: VideoSource) -> None:
        from .io.video import VideoWriter

        self.stems = [name.removesuffix(".mp4") for name in names]
        self.videos = [VideoWriter(out_dir / name, source.fps, source.audio) for name in names]
        self.masks = [VideoWriter(out_dir / f"{stem}_masks.mp4", source.fps) for stem in self.stems]
        self.out_dir, self.source = out_dir, source
        self.picks = torch.linspace(0, source.count - 1, min(5, source.count)).round().long().tolist()
        # per edit, the contact sheet's columns: (source, edited, difference mask[, region]) of each pick
        self.sheet: list[dict[int, tuple[torch.Tensor, ...]]] = [{} for _ in names]

    def __call__(
        self, e: int, start: int, video: torch.Tensor, masks: torch.Tensor, region: torch.Tensor | None
    ) -> None:
        self.videos[e].append(video)
        self.masks[e].append(mask_frames(masks, region))
        for t in self.picks:
            if start <= t < start + video.shape[0]:  # the source reads its frame from the clip it holds
                k = t - start
                self.sheet[e][t] = (self.source.read(t, t + 1)[0], video[k], masks[k],
                                    *((region[k],) if region is not None else ()))  # fmt: skip

    def finish(self) -> list[dict[str, str]]:
        """Close every file (each replaces its name only now) and write the contact sheets."""
        for writer in (*self.videos, *self.masks):
            writer.close()
        outputs = []
        for stem, name, picked in zip(self.stems, self.videos, self.sheet):
            cols = [picked[t] for t in self.picks]
            rows = [torch.stack([c[i] for c in cols]) for i in range(len(cols[0]))]
            sheet = comparison_image(
                rows[0], rows[1], rows[2], len(self.picks), rows[3] if len(rows) > 3 else None
            )
            _save_png(self.out_dir / f"{stem}_masks.png", sheet)
            outputs.append(
                {"video": name.path.name, "masks": f"{stem}_masks.mp4", "contact_sheet": f"{stem}_masks.png"}
            )
        return outputs

    def discard(self) -> None:
        for writer in (*self.videos, *self.masks):
            writer.discard()


def launch_workers(workers: int, argv: list[str]) -> int:
    """``edit --workers N``: the same command through torch's launcher (``torchrun``), N processes on this
    machine; rank 0 denoises the chain, the others prepare clips (``run_edit``)."""
    rest, skip = [], False
    for a in argv:  # the command without --workers
        if skip:
            skip = False
        elif a == "--workers":
            skip = True
        elif not a.startswith("--workers="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
           "-m", "i2vedit", *rest]  # fmt: skip
    return subprocess.run(cmd, check=False).returncode


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of a process started by torch's launcher (``torchrun``); (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def check_same_run(identity: dict[str, Any]) -> None:
    """Refuse, before any compute, ranks of one launch that were given different settings, models or videos
    (gloo all-gather of each rank's identity; rank 0's is the reference)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    everyone: list[dict[str, Any] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, identity)
    for rank, other in enumerate(everyone):
        if other != everyone[0]:
            assert other is not None and everyone[0] is not None
            differ = sorted(k for k in {*other, *everyone[0]} if other.get(k) != everyone[0].get(k))
            raise I2VEditError(
                f"rank {rank} was started with another {', '.join(differ)} than rank 0; start every worker of one "
                "run with the same command."
            )


def run_edit(args: argparse.Namespace) -> dict[str, Any]:
    from .io.frames import fit_size
    from .io.video import VideoSource
    from .run.pipeline import EditSettings, edit_frames, prepare_clips

    out_dir = writable_folder(args.out)
    _check_input_file(args.video, "video", "a video file (mp4, mov, ...)")
    match = None if args.no_matching else MatchConfig.preset(args.preset)
    denoise_dtype, train_dtype = resolve_dtypes(args.dtype, args.train_dtype, model_device())
    settings = EditSettings(
        chunk=args.chunk, steps=args.steps, match=match, mode=args.memory, lora_steps=args.lora_steps,
        seed=args.seed, cfg=(1.0, args.max_cfg), denoise_dtype=denoise_dtype, train_dtype=train_dtype,
        weights_dtype=resolve_weights_dtype(args.weights_dtype, model_device()),
        region_feather=args.region_feather, colour_anchor=args.colour_anchor,
    )  # fmt: skip
    settings.validate()
    if args.size:
        check_generation_size(tuple(args.size), settings.chunk)
    edits = [_read_image(p) for p in args.first_frame]
    names = output_names(args.first_frame)
    check_model_path(args.model)
    source = VideoSource(
        args.video, args.start, args.end, args.sample_fps
    )  # read clip by clip, with its audio
    n, h, w = source.count, source.height, source.width
    size = tuple(args.size) if args.size else fit_size(h, w)
    check_generation_size(size, min(settings.chunk, n))
    region: torch.Tensor | str | None = args.region_lock
    if args.region_lock not in (None, "auto"):
        region = _read_region(args.region_lock, n, h, w)
    check_vram(args, settings, n, size)
    host = load_diffusers_host(args.model, DTYPE, DTYPES[settings.weights_dtype])
    if args.low_memory:
        host.low_memory()
    reuse = _reuse_dir(args)
    rank, world = distributed_rank()
    if world > 1:
        check_same_run({"settings": settings.identity(), "edit": settings.edit_identity(), "model": host.fingerprint(),
                        "video": [str(Path(args.video).resolve()), n, h, w, str(source.fps)], "size": list(size),
                        "reuse": str(reuse.resolve())})  # fmt: skip
    if rank > 0:  # a worker: prepares clips into the shared reuse folder; rank 0 writes the video
        return {"rank": rank, **prepare_clips(host, source, float(source.fps), settings, reuse, size=size)}
    outputs = _Outputs(out_dir, names, source)
    try:
        result = edit_frames(host, source, float(source.fps), edits, settings, size=size, reuse_dir=reuse, region=region,
                             sink=outputs, progress=lambda i: print(f"clip {i['clip'] + 1}/{i['clips']}: {i['stage']}", file=sys.stderr))  # fmt: skip
    except BaseException:
        outputs.discard()  # no half-written video replaces an earlier one; the finished clips stay in the reuse folder
        raise
    written = outputs.finish()
    report = {k: v for k, v in result.report.items() if k != "settings"}
    report["outputs"] = [
        {"first_frame": str(first), **files} for first, files in zip(args.first_frame, written)
    ]
    report["region_lock"] = None if region is None else ("auto" if region == "auto" else args.region_lock)
    report["peak_memory_bytes"] = peak_memory_bytes()
    write_text_atomic(out_dir / "report.json", json.dumps(report, indent=2, default=str), "report")
    return report


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line, ``error: ...``, exit code 2 (argparse's usage dump hides the error)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def finite_float(text: str) -> float:
    """An argparse type: a float that is a finite number (not nan or inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; give an ordinary number")
    return value


def _int_in(lo: int, hi: int | None = None):
    """An argparse type: an integer in ``[lo, hi]``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < lo or (hi is not None and value > hi):
            bound = f"at least {lo}" if hi is None else f"from {lo} to {hi}"
            raise argparse.ArgumentTypeError(f"{value} is out of range; give a whole number {bound}")
        return value

    parse.__name__ = "whole number"
    return parse


def _float_in(lo: float, hi: float):
    def parse(text: str) -> float:
        value = finite_float(text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(
                f"{value:g} is out of range; give a number from {lo:g} to {hi:g}"
            )
        return value

    parse.__name__ = "number"
    return parse


WEIGHTS_HELP = (
    "how the UNet, VAE and image encoder store their weights: fp16 / bf16 take half the memory of fp32. Every "
    "layer still computes in fp32 (diffusers' layerwise casting), the inversion too, so results are those of "
    "fp32 on weights rounded to that dtype (norm layers stay fp32); the --dtype autocast applies on top. "
    "auto: fp16 on a GPU, fp32 on the CPU"
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m i2vedit",
        description="I2VEdit for Stable Video Diffusion: propagate an edited first frame through a video.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    edit = sub.add_parser("edit", help="edit a video from one or more edited first frames (SVD single file or diffusers folder)",
                          description="Propagate edited first frames through a video: clips, inversion, motion "
                          "LoRAs, attention matching. Writes one mp4 per edited frame and report.json.")  # fmt: skip
    edit.add_argument("--video", required=True, help="source video file (mp4, mov, ...)")
    edit.add_argument("--first-frame", required=True, nargs="+",
                      help="edited first frame(s), PNG or JPEG; each gives <name>.mp4 (<name>_2.mp4 … for repeated names)")  # fmt: skip
    edit.add_argument(
        "--model",
        required=True,
        help="SVD single file (svd.safetensors / svd_xt.safetensors, as ComfyUI uses) "
        "or a diffusers SVD folder with unet/, vae/ and image_encoder/",
    )
    edit.add_argument("--out", required=True, help="output folder (created; must be writable)")
    edit.add_argument("--preset", choices=sorted(PRESETS), default="local",
                      help="edit kind: local (object/colour), style (global, same shapes), shape (big shape change)")  # fmt: skip
    edit.add_argument("--no-matching", action="store_true", help="plain denoising from the inversion")
    edit.add_argument("--chunk", type=_int_in(2, MAX_CHUNK), default=14,
                      help="frames per clip (default 14, SVD's length)")  # fmt: skip
    edit.add_argument("--sample-fps", type=finite_float, default=-1,
                      help="resample the video to this rate, at most the video's own (-1: keep)")  # fmt: skip
    edit.add_argument("--start", type=finite_float, default=0.0, help="start time in seconds")
    edit.add_argument("--end", type=finite_float, default=-1.0, help="end time in seconds (-1: the end)")
    edit.add_argument(
        "--steps", type=_int_in(2), default=25, help="denoising and inversion steps (default 25)"
    )
    edit.add_argument(
        "--lora-steps", type=_int_in(0), default=250, help="motion LoRA steps per clip (0: no LoRA)"
    )
    edit.add_argument("--max-cfg", type=_float_in(1.0, MAX_CFG), default=2.0,
                      help="CFG at the last frame, ramping from 1 at the first (default 2; 1 to 50)")  # fmt: skip
    edit.add_argument("--size", type=_int_in(1), nargs=2, metavar=("H", "W"),
                      help=f"generation size, multiples of 64 up to {MAX_SIDE} (SVD's native size: 576 1024)")  # fmt: skip
    edit.add_argument(
        "--reuse", help="folder of saved inversions and LoRAs to reuse or resume (default OUT/reuse)"
    )
    edit.add_argument("--memory", choices=MEMORY_MODES, default="recompute",
                      help="recompute (default): keep latents only; cache: keep attention in RAM (faster, large)")  # fmt: skip
    edit.add_argument("--seed", type=_int_in(0, 2**63 - 1), default=0, help="seed of every random draw")
    edit.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                      help="denoising compute dtype (autocast; weights, inversion and matching scores stay fp32); "
                      "auto: bf16 on a GPU that has it, else fp16 on a GPU, fp32 on the CPU")  # fmt: skip
    edit.add_argument("--train-dtype", choices=["auto", *DTYPES], default="auto",
                      help="motion LoRA training autocast dtype (the LoRA and AdamW state stay fp32); auto: as "
                      "--dtype. fp16 has no loss scaling: prefer bf16")  # fmt: skip
    edit.add_argument("--weights-dtype", choices=["auto", *DTYPES], default="auto", help=WEIGHTS_HELP)
    edit.add_argument("--low-memory", action="store_true",
                      help="less GPU memory, a little slower: one CFG branch per UNet call and the VAE and "
                      "image encoder off the GPU while the UNet runs (same results)")  # fmt: skip
    edit.add_argument("--region-lock", metavar="auto|MASK.png",
                      help="keep everything outside a region exactly as in the source: 'auto' (where the edited "
                      "first frame differs, carried along the video's motion) or a mask image, white where the "
                      "edit may act (default: no lock, the paper's method)")  # fmt: skip
    edit.add_argument(
        "--region-feather",
        type=_int_in(0, 256),
        default=8,
        metavar="PX",
        help="pixels the region lock fades over, inside the region (default 8)",
    )
    edit.add_argument(
        "--colour-anchor",
        action="store_true",
        help="hold each later clip's colours to the frame it continues from (long videos)",
    )
    edit.add_argument("--workers", type=_int_in(1, 1024), default=1, metavar="N",
                      help="prepare clips (inversion, motion LoRA) in N processes through torchrun while one "
                      "denoises the chain (same result); or start the command under torchrun yourself, e.g. "
                      "across machines sharing --reuse")  # fmt: skip
    edit.add_argument("--max-vram", type=_float_in(0.001, 10_000), metavar="GB",
                      help="refuse, before loading the model, a run whose planned GPU memory (weights and the "
                      "largest call of each stage, on the meta device) is over GB (10^9 bytes) in some stage")  # fmt: skip

    demo = sub.add_parser(
        "demo", help="run every stage on a tiny random SVD (no downloads, a few minutes on CPU)"
    )
    demo.add_argument("--out", default="i2vedit-demo", help="output folder (default ./i2vedit-demo)")
    demo.add_argument("--quiet", action="store_true", help="no progress lines")
    demo.add_argument("--video", help=f"a real video to run on: its first {DEMO_FRAMES} frames at {DEMO_FPS:g} fps "
                      f"and within {max(DEMO_SIZE)} pixels, its first frame recoloured, its audio kept")  # fmt: skip

    bench = sub.add_parser("bench", help="print benchmark numbers as one JSON object")
    bench.add_argument(
        "what",
        choices=["attention", "lora", "plan", "gpu", "memory", "scale"],
        help="attention: memory and time of attention matching; lora: motion LoRA training step time and memory; "
        "plan: the whole edit at full size on the meta device (FLOPs, peak memory, predicted time per stage); "
        "gpu: the whole pipeline at full size on random weights (a CUDA GPU; --tiny: the tiny model), time and "
        "memory per stage; memory: peak RSS of the edit command for a 4-clip and a 16-clip video (flat memory); "
        "scale: clip-parallel preparation with 1 and 2 processes, and a model of 8 and 64 GPUs on a 60 s video",
    )
    bench.add_argument(
        "--reps", type=_int_in(1), default=5, help="timed repetitions per measurement (median)"
    )
    gpu = bench.add_argument_group("bench gpu")
    gpu.add_argument(
        "--tiny", action="store_true", help="the tiny random SVD at 64×128 instead of the full size"
    )
    gpu.add_argument("--device", help="torch device (default: cuda when there is one, else cpu)")
    gpu.add_argument("--clips", type=_int_in(1), default=2, help="clips of the synthetic video (default 2)")
    gpu.add_argument("--chunk", type=_int_in(2, MAX_CHUNK), default=14, help="frames per clip (default 14)")
    gpu.add_argument(
        "--steps", type=_int_in(1), default=25, help="denoising and inversion steps (default 25)"
    )
    gpu.add_argument("--lora-steps", type=_int_in(0), default=250, help="LoRA steps per clip (default 250)")
    gpu.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="denoising dtype (as edit)")
    gpu.add_argument(
        "--train-dtype", choices=["auto", *DTYPES], default="auto", help="training dtype (as edit)"
    )
    gpu.add_argument("--weights-dtype", choices=["auto", *DTYPES], default="auto",
                     help="weights storage dtype (as edit)")  # fmt: skip
    gpu.add_argument("--low-memory", action="store_true", help="as edit --low-memory")
    return parser


def _interrupted(args: argparse.Namespace) -> str:
    if args.command == "bench":
        return "interrupted"
    reuse = _reuse_dir(args)
    if any(reuse.glob("clip_*/*.safetensors")):
        return (
            f"interrupted; finished clips are kept in the reuse folder {reuse}, run the same command again "
            "to resume"
        )
    return "interrupted before any clip was finished; run the same command again to start over"


def main(argv: list[str] | None = None) -> int:
    """Run a command; returns the exit code: 0, 2 for bad input (one line ``error: ...``), 130 on Ctrl-C."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or an argument error already printed
        return e.code if isinstance(e.code, int) else 2
    try:
        if args.command == "bench":
            if importlib.util.find_spec(".tools", __package__) is None:
                raise I2VEditError(
                    "the benchmarks are developer tools (i2vedit/tools), which registry installs leave out; "
                    "run them from a git checkout of the pack."
                )
            from .tools import bench, gpu, memory, scale

            runs = {
                "attention": lambda: bench.bench_attention(reps=args.reps),
                "lora": bench.bench_lora,
                "plan": bench.bench_plan,
                "gpu": lambda: gpu.bench_gpu(args.tiny, args.device, None, args.chunk, args.clips, args.steps,
                                             args.lora_steps, None, args.dtype, args.train_dtype,
                                             low_memory=args.low_memory, weights_dtype=args.weights_dtype),
                "memory": memory.bench_memory,
                "scale": scale.bench_scale,
            }  # fmt: skip
            result = runs[args.what]()
        elif args.command == "demo":
            result = run_demo(args.out, progress=not args.quiet, video=args.video)
        elif args.workers > 1 and "RANK" not in os.environ:
            return launch_workers(args.workers, sys.argv[1:] if argv is None else argv)
        else:
            result = run_edit(args)
    except I2VEditError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_interrupted(args), file=sys.stderr)
        return INTERRUPTED
    print(json.dumps(result, indent=2, default=str))
    return 0
