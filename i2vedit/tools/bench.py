"""Benchmarks that print numbers: ``python -m i2vedit bench attention``.

Memory is counted from what our objects actually hold on a tiny run, checked against a per-layer
formula at the tiny size, then evaluated with the same formula at full size (576×1024, 14 frames,
25 steps). Peak extra memory of one spatial layer is measured at full size on the ``meta`` device
(shapes only, exact allocation sizes). Times are medians on the tiny model on this machine's CPU.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from ..host import combine_cfg
from ..hosts.diffusers import tiny
from ..method import native
from ..method.attention import (
    default_query_chunk,
    frame_thresholds,
    sdpa_attention,
    spatial_match,
    spatial_match_reference,
)
from ..method.inversion import invert, replay_source
from ..method.matching import MatchedClip, matched_denoise
from ..method.skip_interval import EditKV, SourceKV
from ..run.memtrack import track_allocations
from ..svd import POSITIONS, SVDCond, TimeIds

FULL_HW = (72, 128)  # 576×1024 pixels
FULL_FRAMES = 14
FULL_STEPS = 25
FULL_CHANNELS = (320, 640, 1280, 1280)
HEAD_DIM = 64


@dataclass(frozen=True)
class Layer:
    tokens: int
    channels: int
    heads: int


def layer_table(latent_hw: tuple[int, int], channels: tuple[int, ...], head_dim: int) -> list[Layer]:
    """The 16 self-attention positions of an SVD UNet: tokens, width and heads of each."""
    out = []
    for pos in POSITIONS:
        level = {1: 0, 2: 1, 4: 2, 8: 3}[pos.downscale]
        hh, ww = -(-latent_hw[0] // pos.downscale), -(-latent_hw[1] // pos.downscale)
        c = channels[level]
        out.append(Layer(hh * ww, c, c // head_dim))
    return out


def capture_bytes(
    layers: list[Layer], frames: int, elem: int, spatial=True, temporal=True, kv_frames=0
) -> int:
    """Bytes of one step's capture: spatial Q+K, temporal probabilities (over frames + kv_frames keys)."""
    total = 0
    for lay in layers:
        if spatial:
            total += 2 * frames * lay.tokens * lay.channels * elem
        if temporal:
            total += lay.tokens * lay.heads * frames * (frames + kv_frames) * elem
    return total


def kv_bytes(layers: list[Layer], frames: int, elem: int, branches: int = 1) -> int:
    """Bytes of one step's temporal K and V of every layer."""
    return sum(2 * lay.tokens * frames * lay.channels * elem * branches for lay in layers)


def trajectory_bytes(steps: int, frames: int, latent_hw: tuple[int, int]) -> int:
    return (steps + 1) * frames * 4 * latent_hw[0] * latent_hw[1] * 4


def _cond(seed: int, hw: tuple[int, int]) -> SVDCond:
    g = torch.Generator().manual_seed(seed)
    return SVDCond(
        torch.randn(1, 1, tiny.CONTEXT_DIM, generator=g),
        torch.randn(1, 4, *hw, generator=g),
        TimeIds(6, 127, 0.02),
    )


def _median_times(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds of each call, the calls interleaved (one of each per round, after a warm-up
    round), so that a change of load on a shared machine weighs on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rnd in range(reps + 1):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            if rnd:
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _three_rows(clip: MatchedClip, x: torch.Tensor, source: SVDCond):
    """One UNet call of three rows (source, uncond, cond): what a matched step's model work costs at least,
    on this machine, whatever the matching costs (the floor of any design with a source replay)."""
    uncond = clip.uncond
    assert uncond is not None
    return lambda: clip.host.denoise(x, 10.1, [source, uncond, clip.cond])


def _plain_step(clip: MatchedClip, x: torch.Tensor):
    """One CFG step of ``clip``'s edit branch at ``x`` without matching: what a matched step is measured against."""
    uncond, cfg = clip.uncond, clip.cfg
    assert uncond is not None and cfg is not None

    def step() -> torch.Tensor:
        out = clip.host.denoise(x, 10.1, [uncond, clip.cond])
        return combine_cfg(out[0], out[1], cfg)

    return step


def bench_real_tokens(frames: int = 4, latent_hw: tuple[int, int] = FULL_HW, reps: int = 3) -> dict[str, Any]:
    """Matched (recompute) over plain step time of the first clip at the full-size token count.

    The tiny-width model at latent 72×128 has 9216 tokens in its largest spatial layers, as the real
    SVD at 576×1024 has, so the attention maps weigh as they do at full size (more: its heads are
    narrow). Stage-1 step (every temporal layer injected, spatial matching everywhere).
    """
    torch.manual_seed(0)
    host = tiny.sharpen_self_attention(tiny.build_tiny_diffusers_host(seed=0))
    z = torch.randn(frames, 4, *latent_hw, generator=torch.Generator().manual_seed(1))
    source = _cond(1, latent_hw)
    inv = invert(host, z, source, steps=3)
    clip = MatchedClip(host, inv, _cond(2, latent_hw))
    x = inv.x_T.clone()
    calls = {
        "plain": _plain_step(clip, x),
        "matched": lambda: clip.denoised(0, x),
        "three": _three_rows(clip, x, source),
    }
    t = _median_times(calls, reps)
    plain, matched = t["plain"], t["matched"]
    return {
        "frames": frames,
        "latent_hw": list(latent_hw),
        "reps": reps,
        "plain_step_seconds": plain,
        "matched_step_seconds_recompute": matched,
        "matched_over_plain_step_time": matched / plain,
        "three_row_call_over_plain_step_time": t["three"] / plain,
    }


def bench_matching_layer(
    frames: int = 4, tokens: int = 9216, heads: int = 2, reps: int = 3
) -> dict[str, Any]:
    """Seconds of one spatial layer at the full-size token count (tiny widths, CPU): plain SDPA, matching by
    the C kernel (``method/native.py``, where it runs) and by torch's blocks, interleaved, median."""
    g = torch.Generator().manual_seed(0)
    q_e, k_e, v_e, q_s, k_s = (
        torch.randn(frames, tokens, heads * tiny.HEAD_DIM, generator=g) for _ in range(5)
    )
    tau = frame_thresholds(frames, (0.35, 0.35))
    chunk = default_query_chunk(q_e.device, heads, tokens)
    calls: dict[str, Callable[[], object]] = {
        "sdpa": lambda: sdpa_attention(q_e, k_e, v_e, heads),
        "torch_blocks": lambda: spatial_match(q_e, k_e, v_e, q_s, k_s, heads, tau, query_chunk=chunk),
    }
    reason = native.unavailable_reason()
    if reason is None:
        calls["c_kernel"] = lambda: spatial_match(q_e, k_e, v_e, q_s, k_s, heads, tau)
    t = _median_times(calls, reps)
    return {
        "frames": frames,
        "tokens": tokens,
        "heads": heads,
        "head_dim": tiny.HEAD_DIM,
        "seconds": t,
        "over_sdpa": {name: sec / t["sdpa"] for name, sec in t.items()},
        "c_kernel": "runs" if reason is None else f"not here: {reason}",
    }


def bench_attention(
    frames: int = 8, latent_hw: tuple[int, int] = (16, 16), reps: int = 5, real_tokens: bool = True
) -> dict[str, Any]:
    """Stored bytes (ours vs the authors'), matched/plain step time and peak memory of the largest layer."""
    torch.manual_seed(0)
    host = tiny.sharpen_self_attention(tiny.build_tiny_diffusers_host(seed=0))
    g = torch.Generator().manual_seed(1)
    z = torch.randn(frames, 4, *latent_hw, generator=g)
    src, edit = _cond(1, latent_hw), _cond(2, latent_hw)
    steps = 6

    # --- what our objects hold, tiny run, checked against the formula --------------------------------
    tiny_layers = layer_table(latent_hw, tiny.block_channels(), tiny.HEAD_DIM)
    inv = invert(host, z, src, steps=steps)
    clip1 = MatchedClip(host, inv, edit)
    res1 = clip1.run()
    held_recompute = inv.stored_bytes() + EditKV(clip1, res1).stored_bytes()
    assert held_recompute == 2 * trajectory_bytes(steps, frames, latent_hw)
    step_cap = replay_source(host, inv, 0, store_dtype=torch.float16)
    assert step_cap.nbytes() == capture_bytes(tiny_layers, frames, 2)
    inv_cache = invert(host, z, src, steps=steps, mode="cache", capture_kv=True, store_dtype=torch.float16)
    clip1c = MatchedClip(host, inv_cache, edit, mode="cache", store_dtype=torch.float16)
    res1c = clip1c.run(capture_kv=True)
    held_cache = inv_cache.stored_bytes() + res1c.stored_bytes()
    expect_cache = steps * (
        capture_bytes(tiny_layers, frames, 2)
        + kv_bytes(tiny_layers, frames, 2)
        + kv_bytes(tiny_layers, frames, 2, 2)
    ) + 2 * trajectory_bytes(steps, frames, latent_hw)
    assert held_cache == expect_cache, (held_cache, expect_cache)

    # --- full size by the same formula -------------------------------------------------------------
    full = layer_table(FULL_HW, FULL_CHANNELS, HEAD_DIM)
    fF, fS = FULL_FRAMES, FULL_STEPS
    authors = fS * capture_bytes(full, fF, 4) + fS * kv_bytes(full, fF, 4)
    ours = 2 * trajectory_bytes(fS, fF, FULL_HW)  # source inversion + edited first clip's trajectory
    ours_cache = fS * (capture_bytes(full, fF, 2) + kv_bytes(full, fF, 2) + kv_bytes(full, fF, 2, 2)) + ours

    # --- step times on the tiny model ----------------------------------------------------------------
    x = inv.x_T.clone()
    z2 = torch.randn(frames, 4, *latent_hw, generator=g)  # a later clip of as many frames as the first
    inv2 = invert(host, z2, src, steps=steps, skip_kv=SourceKV(host, inv))
    clip2 = MatchedClip(host, inv2, edit, skip_kv=EditKV(clip1, res1))
    x2 = inv2.x_T.clone()
    staged = (0, steps // 2, steps - 1)  # stage 1, stage 2, stage 3 of the temporal schedule
    calls: dict[str, Callable[[], object]] = {
        "plain": _plain_step(clip1, x),
        "three": _three_rows(clip1, x, src),
    }
    for k in staged:
        calls[f"recompute_{k}"] = partial(clip1.denoised, k, x)
        calls[f"cache_{k}"] = partial(clip1c.denoised, k, x)
    for k in (0, steps - 1):
        calls[f"skip_{k}"] = partial(clip2.denoised, k, x2)
    times = _median_times(calls, reps)
    rec = statistics.mean(times[f"recompute_{k}"] for k in staged)
    cac = statistics.mean(times[f"cache_{k}"] for k in staged)
    skip = statistics.mean(times[f"skip_{k}"] for k in (0, steps - 1))

    # --- peak extra memory of the largest spatial layer, full size, meta device ---------------------
    big = max(full, key=lambda lay: lay.tokens * lay.channels)
    shape = (fF, big.tokens, big.channels)
    q_e, k_e, v_e, q_s, k_s = (torch.empty(shape, device="meta", dtype=torch.float16) for _ in range(5))
    tau = frame_thresholds(fF, (0.35, 0.35)).to("meta")
    with track_allocations() as chunked:
        spatial_match(q_e, k_e, v_e, q_s, k_s, big.heads, tau)
    with track_allocations() as reference:
        spatial_match_reference(q_e, k_e, v_e, q_s, k_s, big.heads, tau)

    # --- reconstruction from the inversion with the source frame, 25 steps --------------------------
    inv25 = invert(host, z, src, steps=FULL_STEPS)
    rel = lambda a: float((a - z).norm() / z.norm())  # noqa: E731
    rec_plain = rel(matched_denoise(host, inv25, src, config=None, cfg=None).latents)
    rec_matched = rel(matched_denoise(host, inv25, src, cfg=None).latents)

    return {
        "clip": {"height": 576, "width": 1024, "frames": fF, "steps": fS},
        "stored_bytes_authors": authors,
        "stored_bytes_authors_detail": {
            "spatial_qk_fp32_all_steps": fS * capture_bytes(full, fF, 4, temporal=False),
            "temporal_probs_fp32_all_steps": fS * capture_bytes(full, fF, 4, spatial=False),
            "skip_interval_kv_fp32_all_steps": fS * kv_bytes(full, fF, 4),
        },
        "stored_bytes_ours": ours,
        "stored_bytes_ours_detail": "recompute mode (default): source inversion trajectory + edited first clip's "
        "trajectory (skip-interval K/V replayed), fp32 latents",
        "transient_bytes_per_step_ours": capture_bytes(full, fF, 2),
        "stored_bytes_ours_cache_mode": ours_cache,
        "stored_bytes_ours_cache_mode_matching_only": fS * capture_bytes(full, fF, 2) + ours // 2,
        "tiny_run_bytes_checked": {"recompute": held_recompute, "cache": held_cache},
        "matched_over_plain_step_time": rec / times["plain"],
        "matched_over_plain_step_time_cache_mode": cac / times["plain"],
        "three_row_call_over_plain_step_time": times["three"] / times["plain"],
        "matched_over_plain_step_time_skip_interval_clip": skip / times["plain"],
        "plain_step_seconds_tiny_cpu": times["plain"],
        "tiny_step_setup": {
            "frames": frames,
            "latent_hw": list(latent_hw),
            "reps": reps,
            "median": True,
            "interleaved": True,
        },
        "peak_extra_bytes_spatial_layer": chunked.peak_bytes,
        "peak_extra_bytes_spatial_layer_reference_path": reference.peak_bytes,
        "spatial_layer": {
            "tokens": big.tokens,
            "channels": big.channels,
            "heads": big.heads,
            "frames": fF,
            "query_chunk": default_query_chunk(torch.device("meta"), big.heads, big.tokens),
            "dtype": "float16 inputs, fp32 maps",
        },
        "reconstruction_rel_error_tiny_25_steps": {"plain": rec_plain, "matched": rec_matched},
        "real_token_count": bench_real_tokens(reps=min(reps, 3)) if real_tokens else None,
        "matching_layer_real_tokens": bench_matching_layer(reps=min(reps, 3)) if real_tokens else None,
    }


def bench_lora(frames: int = 8, latent_hw: tuple[int, int] = (16, 16), steps: int = 6) -> dict[str, Any]:
    """Seconds per training step and peak tensor memory on the tiny model, with and without checkpointing."""
    from ..hosts.diffusers.lora import DiffusersLoRATrainer
    from ..lora.targets import lora_param_count, target_shapes
    from ..lora.train import TrainConfig, train_motion_lora

    host = tiny.build_tiny_diffusers_host(seed=0)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(frames, 4, *latent_hw, generator=g)
    first = torch.randn(1, 4, *latent_hw, generator=g)
    emb = torch.randn(1, 1, tiny.CONTEXT_DIM, generator=g)
    out: dict[str, Any] = {
        "model": "tiny random SVD (diffusers host, CPU)",
        "frames": frames,
        "latent_hw": list(latent_hw),
        "rank": 32,
        "lora_params_tiny": lora_param_count(target_shapes(host.unet, "temporal", "diffusers"), 32),
        "lora_params_full_svd_rank32": 17_821_696,
    }
    for checkpointing in (False, True):
        trainer = DiffusersLoRATrainer(host, rank=32, gradient_checkpointing=checkpointing)
        cfg = TrainConfig(rank=32, steps=1)
        train_motion_lora(trainer, z, first, emb, cfg)  # warm-up
        times: list[float] = []
        last = [time.perf_counter()]

        def tick(_info, times=times, last=last):
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

        with track_allocations() as mem:
            last[0] = time.perf_counter()
            train_motion_lora(trainer, z, first, emb, TrainConfig(rank=32, steps=steps), callback=tick)
        key = "with_checkpointing" if checkpointing else "without_checkpointing"
        out[key] = {"seconds_per_step": statistics.median(times), "peak_tensor_bytes": mem.peak_bytes}
    out["seconds_per_step"] = out["without_checkpointing"]["seconds_per_step"]
    out["peak_memory_bytes"] = out["without_checkpointing"]["peak_tensor_bytes"]
    return out


GPUS = {"h200": 989e12, "rtx4090": 165e12}  # dense fp16/bf16 tensor-core FLOP/s
UTILISATION = 0.4
PAPER_A100_MINUTES = {"lora_per_clip": 25, "editing_per_clip": 10}  # the paper, Appendix E


def _seconds(flops: float) -> dict[str, float]:
    return {gpu: flops / (peak * UTILISATION) for gpu, peak in GPUS.items()}


def bench_plan() -> dict[str, Any]:
    """The whole edit at full size on the meta device (``hosts.diffusers.plan``), ours beside the authors'."""
    from ..hosts.diffusers.plan import GB, MODEL_FRAMES, meta_host, plan_edit

    out: dict[str, Any] = {
        "how": "models at full size on the meta device; one call of each kind through the real code under "
        "FlopCounterMode and run.memtrack; counts multiply; predicted seconds = FLOPs / (peak × utilisation)",
        "gpus_flops_per_second": GPUS, "utilisation": UTILISATION, "budget_bytes": 16 * GB,
        "paper_a100_minutes": PAPER_A100_MINUTES,
    }  # fmt: skip
    layers = layer_table(FULL_HW, FULL_CHANNELS, HEAD_DIM)
    for model, frames in MODEL_FRAMES.items():
        host = meta_host(torch.float16, torch.float16)
        plan = plan_edit(576, 1024, frames, host=host)
        ours = plan.as_dict()
        for offload in (False, True):
            key = "stages_offloaded" if offload else "stages"
            stages = plan.stages(offload)
            for st in stages.values():
                st["fits_16gb"] = st["peak_bytes"] <= 16 * GB
                st["seconds"] = _seconds(st["flops"])
            ours[key] = stages
        # --low-memory: one CFG branch per UNet call, VAE and image encoder off the device meanwhile
        low = plan_edit(576, 1024, frames, host=host, count_flops=False, low_memory=True).stages()
        ours["stages_low_memory"] = {
            name: {"peak_bytes": st["peak_bytes"], "fits_16gb": st["peak_bytes"] <= 16 * GB}
            for name, st in low.items()
        }
        ours["peak_bytes_low_memory"] = max(st["peak_bytes"] for st in low.values())
        ours["seconds"] = _seconds(ours["flops"])
        clips = plan.settings["clips"]
        per_clip_edit = sum(ours["stages"][s]["flops"] for s in ("denoise", "decode", "condition")) / clips
        ours["minutes_per_clip"] = {
            gpu: {"lora": _seconds(ours["stages"]["lora"]["flops"] / clips)[gpu] / 60,
                  "editing": _seconds(per_clip_edit)[gpu] / 60} for gpu in GPUS
        }  # fmt: skip
        # --- the authors' design, by the formulas of method.md §8, checked against our meta runs ----
        lora = ours["weights_bytes"].get("lora_branch", 0)
        row = next(p for p in plan.parts if p.what == "inversion step, first clip").cost
        step_file = capture_bytes(layers, frames, 4)  # spatial Q/K + temporal probabilities, fp32
        kv32 = kv_bytes(layers, frames, 4)
        denoise0 = next(p for p in plan.parts if p.what == "matched step, first clip")
        denoise1 = next((p for p in plan.parts if p.what == "matched step, later clip"), denoise0)
        weights16 = sum(ours["weights_bytes"].values())
        # their full maps: one frame's (heads, HW, HW) fp32 scores, P^e, P^s at a time (measured on meta)
        big = max(layers, key=lambda lay: lay.tokens * lay.channels)
        q = torch.empty(1, big.tokens, big.channels, device="meta", dtype=torch.float16)
        with track_allocations() as maps:
            spatial_match_reference(q, q, q, q, q, big.heads, frame_thresholds(1, (0.35, 0.35)).to("meta"))
        authors_denoise_flops = 25 * (
            2 * denoise0.cost.flops - row.flops
        )  # no source replay; clip i: no K/V replay
        out[model] = {
            "ours": ours,
            "authors": {
                "stored_bytes_per_step_gpu": step_file,
                "disk_bytes_per_clip": 25 * step_file,
                "skip_interval_caches_bytes": 3 * 25 * kv32,
                "peak_bytes": {
                    "invert": 2 * (weights16 - lora) + 2 * row.peak_bytes + 2 * (step_file + kv32),
                    "denoise_first_clip": weights16 + step_file + denoise0.cost.peak_bytes + maps.peak_bytes,
                    "denoise_later_clip": weights16
                    + step_file
                    + kv32
                    + denoise1.cost.peak_bytes
                    + maps.peak_bytes,
                    "lora": ours["stages"]["lora"]["peak_bytes"] + ours["weights_bytes"]["unet"],
                },
                "peak_bytes_how": "invert: fp32 models, an fp32 pass (2 × our fp16 one), the step's Q/K and K/V "
                "twice (deepcopy, save); denoise: fp16 models, the step file on the GPU, our matched step's "
                "peak, plus one frame's full fp32 maps (measured on meta); lora: fp32 UNet weights, "
                "our checkpointed step otherwise",
                "full_maps_one_frame_bytes": maps.peak_bytes,
                "flops": {
                    "invert": 2 * 25 * row.flops,
                    "denoise": authors_denoise_flops,
                    "lora": ours["stages"]["lora"]["flops"],
                },
                "seconds": _seconds(
                    2 * 25 * row.flops + authors_denoise_flops + ours["stages"]["lora"]["flops"]
                ),
            },
        }
    return out
