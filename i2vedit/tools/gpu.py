"""``python -m i2vedit bench gpu``: the whole pipeline at full size on random weights, per-stage time and memory.

For the day a GPU is at hand: it builds the full-size SVD (diffusers' default
``UNetSpatioTemporalConditionModel`` config, which is SVD's, the ``AutoencoderKLTemporalDecoder`` of
SVD's VAE config and a CLIP ViT-H/14 image encoder) with random weights directly on the device, in
fp32, stores them as ``edit --weights-dtype`` does (``auto``: fp16 on a GPU), and runs ``run.pipeline.edit_video`` on a synthetic video of 2 clips (27 frames at 576×1024)
with the paper's settings: 25 steps, 250 motion-LoRA steps per clip at about 512×896, matching
(``local``), skip-interval K/V, recompute mode; denoising and training in the device's ``auto`` dtype
(bf16 on an H200). Each stage's seconds are the pipeline's own ``Timer``; its memory is the peak from
its start to the next stage's start: ``torch.cuda.max_memory_allocated`` on CUDA (reset at each stage),
peak tensor bytes (``memtrack``) on the CPU. It prints one JSON object.

Prediction for an H200 (989 dense bf16 TFLOP/s, 67 fp32; counted on the meta device with torch's
``FlopCounterMode``: one UNet branch is 44.8 TFLOP at 576×1024×14 and 33.3 at 512×896×14):
inversion in fp32, 3 clip inversions' worth with the skip-interval replays and the first clip again at
training size, about 70 s; training, 2 × 250 steps of forward + backward (plus a K/V replay per step
for clip 2) in bf16, about 100 s; matched denoising, 2 × 25 steps of 3 branches in bf16 plus the fp32
matching scores, about 35 s; VAE and model build about 25 s. About 4 minutes, so under 8 even at
half the assumed efficiency (40 % of peak in bf16, 75 % in fp32). ``--tiny`` runs the same code on the
tiny random SVD (``hosts.diffusers.tiny``), which is how the tests exercise it on the CPU.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import torch

from ..errors import I2VEditError
from ..hosts.diffusers import tiny
from ..hosts.diffusers.host import DiffusersSVDHost, with_stored_weights
from ..hosts.diffusers.plan import weights_bytes
from ..hosts.diffusers.single_file import SVD_CLIP_CONFIG, SVD_VAE_CONFIG
from ..io.synthetic import demo_video
from ..method.controller import MatchConfig
from ..precision import DTYPES, resolve_dtypes, resolve_weights_dtype
from ..run.memtrack import AllocationTracker, track_allocations
from ..run.pipeline import EditSettings, edit_video

FULL_SIZE = (576, 1024)
TINY_SIZE = (64, 128)


def build_full_host(device: torch.device) -> DiffusersSVDHost:
    """The full-size SVD with random weights, made on ``device`` in fp32 (fast: no CPU init, no copy)."""
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device(device):
        unet = UNetSpatioTemporalConditionModel()
        vae = AutoencoderKLTemporalDecoder(**SVD_VAE_CONFIG)
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**SVD_CLIP_CONFIG))
    # a few parameters are built with ``torch.Tensor([...])``, which ignores the default device
    return DiffusersSVDHost(unet.to(device), vae.to(device), clip.to(device))


class StageMemory:
    """A pipeline progress hook: the peak memory from each stage's start to the next one's, per stage name.

    On CUDA it reads and resets ``torch.cuda.max_memory_allocated``, synchronising first so a stage's
    queued kernels are not timed into the next; elsewhere it reads and resets ``tracker``'s peak.
    """

    def __init__(self, device: torch.device, tracker: AllocationTracker | None) -> None:
        self.device, self.tracker = device, tracker
        self.peaks: dict[str, int] = {}
        self.current: str | None = None

    def _read_and_reset(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return int(peak)
        assert self.tracker is not None
        peak = self.tracker.peak_bytes
        self.tracker.reset_peak()
        return int(peak)

    def __call__(self, info: dict[str, Any]) -> None:
        self.finish()
        self.current = str(info["stage"])

    def finish(self) -> None:
        """Close the stage running now (call once more after the run)."""
        peak = self._read_and_reset()
        if self.current is not None:
            self.peaks[self.current] = max(self.peaks.get(self.current, 0), peak)


def bench_gpu(
    tiny_model: bool = False,
    device: str | torch.device | None = None,
    size: tuple[int, int] | None = None,
    chunk: int = 14,
    clips: int = 2,
    steps: int = 25,
    lora_steps: int = 250,
    lora_rank: int | None = None,
    dtype: str = "auto",
    train_dtype: str = "auto",
    seed: int = 0,
    low_memory: bool = False,
    weights_dtype: str = "auto",
) -> dict[str, Any]:
    """Run the pipeline once on a synthetic ``clips``-clip video and report seconds and memory per stage.

    Defaults are the full-size run (``tiny_model=False``: needs a CUDA GPU). ``dtype`` / ``train_dtype``:
    as ``edit``'s ``--dtype`` / ``--train-dtype`` (``precision.resolve_dtypes``); ``weights_dtype``: as its
    ``--weights-dtype`` (``precision.resolve_weights_dtype``); ``low_memory``: as
    ``edit --low-memory`` (``DiffusersSVDHost.low_memory``).
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not tiny_model and dev.type != "cuda":
        raise I2VEditError(
            f"the full-size bench builds a 1.5 B-parameter UNet and runs the pipeline at 576×1024: it needs a "
            f"CUDA GPU, and the device is {dev}. Run `bench gpu --tiny` for the same code on the tiny model."
        )
    if clips < 1 or chunk < 2:
        raise I2VEditError(f"give at least 1 clip of at least 2 frames, got {clips} of {chunk}.")
    denoise, train = resolve_dtypes(dtype, train_dtype, dev)
    weights = resolve_weights_dtype(weights_dtype, dev)
    height, width = size or (TINY_SIZE if tiny_model else FULL_SIZE)
    frames = clips * (chunk - 1) + 1  # clips overlap by one frame
    settings = EditSettings(
        chunk=chunk, steps=steps, match=MatchConfig.preset("local"), lora_steps=lora_steps,
        lora_rank=lora_rank or (4 if tiny_model else 32), seed=seed, denoise_dtype=denoise, train_dtype=train,
        weights_dtype=weights,
    ).validate()  # fmt: skip
    video, edited = demo_video(frames, (height, width))

    t0 = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    torch.manual_seed(seed)
    if tiny_model:
        host = tiny.sharpen_self_attention(tiny.build_tiny_diffusers_host(seed=seed))
        for module in (host.unet, host.vae, host.image_encoder):
            module.to(dev)
    else:
        host = build_full_host(dev)
    host = with_stored_weights(host, DTYPES[weights])
    if low_memory:
        host.low_memory()
    build_seconds = time.perf_counter() - t0

    tracker = None if dev.type == "cuda" else track_allocations()
    memory = StageMemory(dev, tracker)
    t0 = time.perf_counter()
    with tracker if tracker is not None else nullcontext():
        memory.finish()  # the peak starts here: the models' weights are already on the device
        result = edit_video(host, video, 8.0, [edited], settings, progress=memory)
        memory.finish()
    total = time.perf_counter() - t0

    seconds, calls = result.report["seconds"], result.report["calls"]
    stages = {
        name: {"seconds": seconds[name], "calls": calls[name], "peak_bytes": memory.peaks.get(name)}
        for name in seconds
    }
    run_settings = {
        "chunk": chunk, "steps": steps, "lora_steps": lora_steps, "lora_rank": settings.lora_rank,
        "train_size": result.report["train_size"], "matching": "local", "mode": settings.mode,
        "skip_interval": settings.skip_interval, "low_memory": low_memory,
    }  # fmt: skip
    return {
        "model": "tiny random-weight SVD"
        if tiny_model
        else "full-size random-weight SVD (UNet, VAE, CLIP ViT-H/14)",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev),
        "torch": torch.__version__,
        "video": {"frames": frames, "height": height, "width": width, "clips": result.report["clips"]},
        "settings": run_settings,
        "dtypes": {"inversion": "fp32", **result.report["dtypes"]},
        "memory_measure": "torch.cuda.max_memory_allocated per stage (weights included)"
        if dev.type == "cuda"
        else "peak tensor bytes per stage beyond the weights (i2vedit.run.memtrack)",
        "stages": stages,
        "seconds_build": build_seconds,
        "seconds_run": total,
        "peak_bytes": max((s["peak_bytes"] or 0 for s in stages.values()), default=0),
        "weights_bytes": sum(weights_bytes(m) for m in (host.unet, host.vae, host.image_encoder)),
    }
