"""``python -m i2vedit bench scale``: clip-parallel preparation, measured here and modelled at full size.

Measured: the preparation stage (SARP, inversion, motion LoRA of every clip) of a 6-clip video on the tiny
random SVD, by 1 and by 2 processes started by torch's launcher, each process one thread; the wall time
from launch to the last process's exit, start-up and model loading included.

Modelled: wall time of the whole edit of a 60 s video sampled at 7 fps (420 frames: clips of 14 frames)
on 1, 8 and 64 GPUs, from ``bench plan``'s per-stage FLOPs at 576×1024 (svd, fp16) and a GPU's dense
peak at the plan's utilisation. Rank 0 prepares clip 0, then denoises the chain, each clip as soon as it
is prepared and the previous one is denoised, and prepares the next free clip whenever it would wait; the
other ranks prepare free clips in order, each after its own inversion of clip 0 at training size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..hosts.diffusers.tiny import build_tiny_diffusers_host
from ..io.frames import clip_ranges
from ..io.synthetic import demo_video
from ..io.video import write_video

CLIPS, CHUNK = 6, 4
STEPS, LORA_STEPS, SIZE = 4, 8, (64, 128)
VIDEO_SECONDS, SAMPLE_FPS, FULL_CHUNK = 60, 7, 14
GPU_COUNTS = (1, 8, 64)


def worker(video: str, reuse: str) -> dict[str, Any]:
    """One rank of the measured run: prepares free clips into ``reuse`` (``pipeline.prepare_clips``)."""
    from ..io.video import VideoSource
    from ..run.pipeline import EditSettings, prepare_clips

    host = build_tiny_diffusers_host(seed=0)
    source = VideoSource(video)
    settings = EditSettings(chunk=CHUNK, steps=STEPS, lora_steps=LORA_STEPS)
    return {"rank": int(os.environ.get("RANK", "0")),
            **prepare_clips(host, source, float(source.fps), settings, reuse, size=SIZE)}  # fmt: skip


def _measure(processes: int, video: Path, root: Path) -> dict[str, Any]:
    reuse = root / f"reuse_{processes}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
           "-m", "i2vedit.tools.scale", str(video), str(reuse)]  # fmt: skip
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    seconds = time.perf_counter() - t
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    ranks = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {"processes": processes, "wall_seconds": seconds,
            "prepared_by_rank": {r["rank"]: r["prepared_here"] for r in ranks}}  # fmt: skip


def simulate(clips: int, gpus: int, prepare: float, edit: float, first_at_train_size: float) -> float:
    """Wall seconds of a clip-parallel edit (see the module docstring), event by event.

    ``prepare``/``edit``: one clip's preparation (encode, inversion, LoRA) and edit (condition, denoise,
    decode); ``first_at_train_size``: clip 0's inversion at training size, which every process that trains
    a later clip's LoRA makes once.
    """
    free = list(range(1, clips))
    ready = {0: prepare}
    t, paid = prepare, False  # rank 0's clock; whether it has made clip 0 at training size
    workers = [prepare + first_at_train_size] * (gpus - 1)  # each starts once clip 0 is ready

    def claims_until(until: float) -> None:  # idle workers take free clips in order, in time order
        while free and workers and min(workers) <= until:
            w = workers.index(min(workers))
            workers[w] += prepare
            ready[free.pop(0)] = workers[w]

    for k in range(clips):
        while True:
            claims_until(t)
            if ready.get(k, float("inf")) <= t:
                break
            if free:  # clip k itself if nobody has it, else the next free clip while it waits
                j = k if k in free else free[0]
                free.remove(j)
                t += prepare + (0.0 if paid else first_at_train_size)
                paid, ready[j] = True, t
            else:
                t = ready[k]
        t += edit
    return t


def _model() -> dict[str, Any]:
    from ..hosts.diffusers.plan import meta_host, plan_edit
    from .bench import GPUS, UTILISATION

    plan = plan_edit(576, 1024, FULL_CHUNK, host=meta_host(torch.float16, torch.float16))
    stages = plan.stages()
    clips_in_plan = plan.settings["clips"]
    per_clip = {
        "prepare": sum(stages[s]["flops"] for s in ("encode", "invert", "train_encode", "lora"))
        / clips_in_plan,
        "edit": sum(stages[s]["flops"] for s in ("condition", "denoise", "decode")) / clips_in_plan,
        "first_at_train_size": stages["invert_train_res"]["flops"],
    }
    frames = VIDEO_SECONDS * SAMPLE_FPS
    clips = len(clip_ranges(frames, FULL_CHUNK, 1))
    out: dict[str, Any] = {"video": f"{VIDEO_SECONDS} s at {SAMPLE_FPS} fps: {frames} frames, {clips} clips of "
                           f"{FULL_CHUNK}", "per_clip_flops": per_clip, "utilisation": UTILISATION}  # fmt: skip
    for gpu, peak in GPUS.items():
        sec = {k: v / (peak * UTILISATION) for k, v in per_clip.items()}
        walls = {
            n: simulate(clips, n, sec["prepare"], sec["edit"], sec["first_at_train_size"]) for n in GPU_COUNTS
        }
        out[gpu] = {
            "seconds_per_clip": sec,
            "wall_hours": {str(n): w / 3600 for n, w in walls.items()},
            "speed_up": {str(n): walls[1] / w for n, w in walls.items()},
        }
    return out


def bench_scale() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="i2vedit-bench-scale-") as tmp:
        root = Path(tmp)
        video, _ = demo_video(CLIPS * (CHUNK - 1) + 1, (64, 96))
        write_video(root / "v.mp4", video, 8)
        runs = [_measure(n, root / "v.mp4", root) for n in (1, 2)]
    return {
        "measured": {
            "what": f"preparation of {CLIPS} clips on the tiny SVD (clips of {CHUNK} frames at {SIZE}, {STEPS} steps, {LORA_STEPS} LoRA steps), one thread per process, this machine",
            "runs": runs,
            "speed_up_2_processes": runs[0]["wall_seconds"] / runs[1]["wall_seconds"],
        },
        "model_full_size": _model(),
    }


if __name__ == "__main__":
    print(json.dumps(worker(*sys.argv[1:3]), default=str))
