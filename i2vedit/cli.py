"""``python -m i2vedit edit|demo|bench``: the headless entry points (diffusers host)."""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .control import PRESETS, MatchConfig
from .errors import I2VEditError
from .files import writable_folder

DEMO_SIZE = (128, 192)
DEMO_FRAMES = 10


def _peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def demo_video(
    frames: int = DEMO_FRAMES, size: tuple[int, int] = DEMO_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """A textured square moving over a flat background (so SARP has work), and its first frame recoloured."""
    h, w = size
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    background = torch.tensor([0.55, 0.7, 0.85])
    side = h // 3
    out, masks = [], []
    for f in range(frames):
        top, left = (
            h // 3 + int(6 * torch.sin(torch.tensor(f / 3.0))),
            8 + f * (w - side - 16) // max(frames - 1, 1),
        )
        inside = (yy >= top) & (yy < top + side) & (xx >= left) & (xx < left + side)
        checker = (((yy - top) // 6 + (xx - left) // 6) % 2).float()
        obj = torch.stack([0.9 * checker + 0.1, 0.3 * checker + 0.2, 0.1 + 0 * checker], -1)
        frame = torch.where(inside[..., None], obj, background.expand(h, w, 3))
        out.append(frame)
        masks.append(inside)
    video = torch.stack(out)
    edited = video[:1].clone()
    edited[0][masks[0]] = edited[0][masks[0]][:, [2, 1, 0]] * 0.6 + torch.tensor([0.0, 0.3, 0.4])  # recolour
    return video, edited.clamp(0, 1)


def comparison_image(
    source: torch.Tensor, edited: torch.Tensor, masks: torch.Tensor, columns: int = 5
) -> torch.Tensor:
    """Rows: source, edited, difference masks, for ``columns`` frames spread over the video."""
    idx = torch.linspace(0, source.shape[0] - 1, min(columns, source.shape[0])).round().long()
    rows = [
        torch.cat(list(source[idx]), 1),
        torch.cat(list(edited[idx]), 1),
        torch.cat(list(masks[idx, ..., None].expand(-1, -1, -1, 3)), 1),
    ]
    return torch.cat(rows, 0)


def _save_png(path: Path, image: torch.Tensor) -> None:
    import cv2

    rgb = (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise I2VEditError(f"could not write {path}; check the folder is writable.")


def _export_loras(reuse: Path, out: Path) -> list[str]:
    names = []
    for clip_dir in sorted(reuse.glob("clip_*")):
        lora = clip_dir / "lora.safetensors"
        if lora.is_file():
            target = out / f"motion_lora_{clip_dir.name}.safetensors"
            shutil.copyfile(lora, target)
            names.append(target.name)
    return names


def run_demo(out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Every stage on a tiny random SVD: no downloads. Writes videos, comparison, LoRAs and a report."""
    from .hosts.diffusers_host import build_tiny_diffusers_host, sharpen_self_attention
    from .pipeline import EditSettings, edit_frames
    from .video_io import write_video

    out_dir = writable_folder(out)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    host = sharpen_self_attention(build_tiny_diffusers_host(seed=0))
    source, edited = demo_video()
    fps = 8.0
    settings = EditSettings(chunk=6, overlap=1, steps=12, lora_steps=10, lora_rank=8, lora_lr=1e-3, seed=0)

    def show(info: dict[str, Any]) -> None:
        if progress:
            eta = "" if info["eta"] is None else f", about {info['eta']:.0f} s left"
            print(f"[demo] clip {info['clip'] + 1}/{info['clips']}: {info['stage']}{eta}", file=sys.stderr)

    reuse = out_dir / "reuse"
    result = edit_frames(
        host, source, fps, [edited], settings, size=DEMO_SIZE, reuse_dir=reuse, progress=show
    )
    write_video(out_dir / "source.mp4", source, fps)
    write_video(out_dir / "edited.mp4", result.videos[0], fps)
    _save_png(out_dir / "comparison.png", comparison_image(source, result.videos[0], result.masks[0]))
    loras = _export_loras(reuse, out_dir)
    report = {
        "note": "tiny random-weight SVD: this proves the install and runs every stage; it makes no meaningful edit",
        "frames": result.report["frames"],
        "clips": result.report["clips"],
        "clip_ranges": result.report["clip_ranges"],
        "size": result.report["size"],
        "seconds_per_stage": result.report["seconds"],
        "stage_calls": result.report["calls"],
        "seconds_total": time.perf_counter() - t0,
        "peak_memory_bytes": _peak_rss_bytes(),
        "stored_bytes": result.report["stored_bytes"],
        "loras": loras,
        "outputs": ["source.mp4", "edited.mp4", "comparison.png", "report.json"],
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def check_model_path(model: str | Path) -> Path:
    """Refuse, before any work, a model path the command line cannot load."""
    p = Path(model)
    if p.is_file():
        if p.suffix.lower() != ".safetensors":
            raise I2VEditError(
                f"{p} is a single file but not .safetensors; the command line reads an SGM single-file SVD "
                "checkpoint (svd.safetensors / svd_xt.safetensors) or a diffusers SVD folder (unet/, vae/, "
                "image_encoder/). Pickle checkpoints (.ckpt, .pt) are not loaded, because unpickling can run code."
            )
        from .hosts.single_file import check_single_file

        return check_single_file(p)
    missing = [s for s in ("unet", "vae", "image_encoder") if not (p / s).is_dir()]
    if missing:
        raise I2VEditError(
            f"{p} is not a diffusers SVD folder: it lacks {', '.join(missing)}/. Give such a folder or a "
            "single-file svd.safetensors / svd_xt.safetensors."
        )
    return p


def load_diffusers_host(model: str | Path, dtype: torch.dtype = torch.float32):
    """SVD from a diffusers folder (unet/, vae/, image_encoder/ as on the Hub) or an SGM single file
    (``svd.safetensors`` / ``svd_xt.safetensors``), loaded from disk only."""
    p = check_model_path(model)
    if p.is_file():
        from .hosts.single_file import load_single_file

        return load_single_file(p, dtype=dtype)
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionModelWithProjection

    from .hosts.diffusers_host import DiffusersSVDHost

    kw = {"local_files_only": True, "use_safetensors": True}
    unet = UNetSpatioTemporalConditionModel.from_pretrained(p, subfolder="unet", **kw)
    vae = AutoencoderKLTemporalDecoder.from_pretrained(p, subfolder="vae", **kw)
    clip = CLIPVisionModelWithProjection.from_pretrained(p, subfolder="image_encoder", **kw)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return DiffusersSVDHost(unet.to(device, dtype), vae.to(device), clip.to(device), dtype=dtype)


def _read_image(path: str) -> torch.Tensor:
    import cv2

    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise I2VEditError(f"cannot read the image {path}; give a PNG or JPEG file.")
    return torch.from_numpy(cv2.cvtColor(img, cv2.COLOR_BGR2RGB)).float().div(255).unsqueeze(0)


def run_edit(args: argparse.Namespace) -> dict[str, Any]:
    from .pipeline import EditSettings, edit_frames
    from .video_io import read_video, write_video

    out_dir = writable_folder(args.out)
    if not Path(args.video).is_file():
        raise I2VEditError(f"no video at {args.video}; check the path.")
    edits = [_read_image(p) for p in args.first_frame]
    check_model_path(args.model)
    frames, fps = read_video(args.video, args.start, args.end, args.sample_fps)
    match = None if args.no_matching else MatchConfig.preset(args.preset)
    settings = EditSettings(
        chunk=args.chunk, steps=args.steps, match=match, mode=args.memory, lora_steps=args.lora_steps,
        seed=args.seed, cfg=(1.0, args.max_cfg),
    )  # fmt: skip
    settings.validate()
    host = load_diffusers_host(args.model)
    size = tuple(args.size) if args.size else None
    reuse = Path(args.reuse) if args.reuse else out_dir / "reuse"
    result = edit_frames(host, frames, fps, edits, settings, size=size, reuse_dir=reuse,
                         progress=lambda i: print(f"clip {i['clip'] + 1}/{i['clips']}: {i['stage']}", file=sys.stderr))  # fmt: skip
    for path, video in zip(args.first_frame, result.videos):
        write_video(out_dir / f"{Path(path).stem}.mp4", video, fps)
    report = {k: v for k, v in result.report.items() if k != "settings"}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m i2vedit",
        description="I2VEdit for Stable Video Diffusion: propagate an edited first frame through a video.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    edit = sub.add_parser("edit", help="edit a video from one or more edited first frames (SVD single file or diffusers folder)",
                          description="Propagate edited first frames through a video: clips, inversion, motion "
                          "LoRAs, attention matching. Writes one mp4 per edited frame and report.json.")  # fmt: skip
    edit.add_argument("--video", required=True, help="source video file (mp4, mov, ...)")
    edit.add_argument("--first-frame", required=True, nargs="+", help="edited first frame(s), PNG or JPEG")
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
    edit.add_argument("--chunk", type=int, default=14, help="frames per clip (default 14, SVD's length)")
    edit.add_argument(
        "--sample-fps", type=float, default=-1, help="resample the video to this rate (-1: keep)"
    )
    edit.add_argument("--start", type=float, default=0.0, help="start time in seconds")
    edit.add_argument("--end", type=float, default=-1.0, help="end time in seconds (-1: the end)")
    edit.add_argument("--steps", type=int, default=25, help="denoising and inversion steps (default 25)")
    edit.add_argument("--lora-steps", type=int, default=250, help="motion LoRA steps per clip (0: no LoRA)")
    edit.add_argument("--max-cfg", type=float, default=2.0, help="CFG at the last frame (ramps from 1)")
    edit.add_argument(
        "--size", type=int, nargs=2, metavar=("H", "W"), help="generation size, multiples of 64"
    )
    edit.add_argument(
        "--reuse", help="folder of saved inversions and LoRAs to reuse or resume (default OUT/reuse)"
    )
    edit.add_argument("--memory", choices=["recompute", "cache"], default="recompute",
                      help="recompute (default): keep latents only; cache: keep attention in RAM (faster, large)")  # fmt: skip
    edit.add_argument("--seed", type=int, default=0, help="seed of every random draw")

    demo = sub.add_parser(
        "demo", help="run every stage on a tiny random SVD (no downloads, a few minutes on CPU)"
    )
    demo.add_argument("--out", default="i2vedit-demo", help="output folder (default ./i2vedit-demo)")
    demo.add_argument("--quiet", action="store_true", help="no progress lines")

    bench = sub.add_parser("bench", help="print benchmark numbers as one JSON object")
    bench.add_argument(
        "what",
        choices=["attention", "lora"],
        help="attention: memory and time of attention matching; lora: motion LoRA training step time and memory",
    )
    bench.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement (median)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "bench":
            from . import bench

            if args.reps < 1:
                raise I2VEditError("--reps must be at least 1")
            result = bench.bench_attention(reps=args.reps) if args.what == "attention" else bench.bench_lora()
        elif args.command == "demo":
            result = run_demo(args.out, progress=not args.quiet)
        else:
            result = run_edit(args)
    except I2VEditError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0
