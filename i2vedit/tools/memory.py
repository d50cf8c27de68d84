"""``python -m i2vedit bench memory``: peak RSS of the command line's edit for a short and a long video.

The edit reads the video and writes its outputs clip by clip, so its memory does not grow with the
video's length. Each run is its own process (``python -m i2vedit edit`` on the tiny random SVD, written
as a diffusers folder), whose peak RSS its report gives; both videos are made here, at a source size
large enough (480×640) that holding the whole video would show: the long video's frames alone take
``whole_video_float32_bytes`` as float32.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from ..hosts.diffusers.tiny import write_tiny_svd_folder
from ..io.synthetic import moving_square
from ..io.video import write_video

SOURCE_SIZE = (480, 640)
CHUNK = 4  # frames per clip, overlapping by one: a video of k clips has k·(CHUNK − 1) + 1 frames
EDIT_ARGS = [
    "--size",
    "64",
    "64",
    "--chunk",
    str(CHUNK),
    "--steps",
    "2",
    "--lora-steps",
    "1",
    "--no-matching",
]


def _edit(root: Path, video: Path, edited: Path, model: Path, name: str) -> dict[str, Any]:
    out = root / name
    cmd = [sys.executable, "-m", "i2vedit", "edit", "--video", str(video), "--first-frame", str(edited),
           "--model", str(model), "--out", str(out), *EDIT_ARGS]  # fmt: skip
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    return {
        "clips": report["clips"], "frames": report["frames"], "peak_rss_bytes": report["peak_memory_bytes"],
        "seconds": time.perf_counter() - t,
    }  # fmt: skip


def bench_memory(short_clips: int = 4, long_clips: int = 16) -> dict[str, Any]:
    """Peak RSS of one edit of a ``short_clips`` and one of a ``long_clips`` video, and their ratio."""
    with tempfile.TemporaryDirectory(prefix="i2vedit-bench-memory-") as tmp:
        root = Path(tmp)
        model = root / "svd"
        write_tiny_svd_folder(model)
        first, _ = moving_square(1, SOURCE_SIZE)
        edited = first[0].clone()
        edited[..., 0] = 1 - edited[..., 0]  # a visible edit
        png = root / "edited.png"
        cv2.imwrite(
            str(png), cv2.cvtColor((edited.numpy() * 255).round().astype(np.uint8), cv2.COLOR_RGB2BGR)
        )
        runs = {}
        for clips in (short_clips, long_clips):
            video = root / f"video_{clips}.mp4"
            write_video(video, moving_square(clips * (CHUNK - 1) + 1, SOURCE_SIZE)[0], 8)
            runs[clips] = _edit(root, video, png, model, f"out_{clips}")
    short, long = runs[short_clips], runs[long_clips]
    ratio = long["peak_rss_bytes"] / short["peak_rss_bytes"]
    h, w = SOURCE_SIZE
    return {
        "what": "peak RSS of `python -m i2vedit edit` (tiny random SVD, one process per video)",
        "source_size": list(SOURCE_SIZE),
        "edit_args": EDIT_ARGS,
        "runs": {f"{clips}_clips": run for clips, run in runs.items()},
        "long_over_short_peak_rss": ratio,
        "within_10_percent": abs(ratio - 1) <= 0.10,
        "whole_video_float32_bytes": long["frames"] * h * w * 3 * torch.finfo(torch.float32).bits // 8,
    }
