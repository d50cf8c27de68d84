"""Compute dtypes (``i2vedit.precision``): bf16 / fp16 autocast for denoising and LoRA training, fp32 elsewhere.

On the CPU with the tiny diffusers SVD: the default fp32 runs no autocast at all (the same bits as
before the choice existed); bf16 takes effect, stays finite and close to fp32, and repeats bit for bit
for a seed; what the paper keeps in fp32 stays fp32 inside an autocast region.
"""

from __future__ import annotations

import logging

import pytest
import torch

from i2vedit.errors import I2VEditError
from i2vedit.hosts.diffusers.host import DiffusersSVDHost, store_weights, with_stored_weights
from i2vedit.hosts.diffusers.tiny import build_tiny_diffusers_host
from i2vedit.lora.train import TrainConfig
from i2vedit.method.attention import attention_probs, frame_thresholds, spatial_match
from i2vedit.precision import (
    DTYPES,
    autocast_region,
    check_device,
    default_dtype,
    resolve_dtypes,
    resolve_weights_dtype,
)
from i2vedit.run.pipeline import EditSettings, edit_video
from i2vedit.run.stages import train_clip_lora

SETTINGS = EditSettings(chunk=4, steps=3, lora_steps=2, lora_rank=4)


@pytest.fixture(scope="module")
def host():
    return build_tiny_diffusers_host(seed=0)


@pytest.fixture(scope="module")
def video():
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(7, 64, 128, 3, generator=g)
    return frames, [frames[:1].flip(-1)]


@pytest.fixture(scope="module")
def fp32_run(host, video):
    frames, edits = video
    return edit_video(host, frames, 8.0, edits, SETTINGS)


def _bf16(**kw):
    return EditSettings(**{**SETTINGS.__dict__, "denoise_dtype": "bf16", "train_dtype": "bf16", **kw})


def test_bf16_denoising_and_training_is_finite_close_to_fp32_and_repeats_for_a_seed(host, video, fp32_run):
    frames, edits = video
    a = edit_video(host, frames, 8.0, edits, _bf16())
    b = edit_video(host, frames, 8.0, edits, _bf16())
    assert torch.equal(a.videos[0], b.videos[0]) and torch.equal(a.masks[0], b.masks[0])
    ref = fp32_run.videos[0]
    diff = (a.videos[0] - ref).abs()
    assert torch.isfinite(a.videos[0]).all()
    # bf16 keeps 8 significant bits (about 0.4 % per operation); through 3 steps of 2 clips of a random
    # UNet the frames differ from fp32 by a mean of about 0.004 and at most about 0.07 on a [0, 1] scale
    assert 0 < float(diff.mean()) < 0.02 and float(diff.max()) < 0.2
    assert a.report["dtypes"] == {"weights": "fp32", "denoise": "bf16", "train": "bf16"}
    assert fp32_run.report["dtypes"] == {"weights": "fp32", "denoise": "fp32", "train": "fp32"}


def test_the_default_is_fp32_without_any_autocast_region(host, video, fp32_run):
    assert SETTINGS.denoise_dtype == "fp32" and SETTINGS.train_dtype == "fp32"
    assert type(autocast_region("cpu", None)) is type(autocast_region("cpu", torch.float32))
    assert not isinstance(autocast_region("cpu", torch.float32), torch.autocast)
    frames, edits = video
    again = edit_video(
        host, frames, 8.0, edits, EditSettings(**{**SETTINGS.__dict__, "denoise_dtype": "fp32"})
    )
    assert torch.equal(again.videos[0], fp32_run.videos[0])


def test_a_reduced_dtype_has_its_own_reuse_identity_and_fp32_keeps_the_old_one():
    assert "denoise_dtype" not in SETTINGS.edit_identity() and "train_dtype" not in SETTINGS.identity()
    assert _bf16().edit_identity()["denoise_dtype"] == "bf16" and _bf16().identity()["train_dtype"] == "bf16"


def test_bf16_training_keeps_the_lora_and_its_optimiser_fp32(host):
    g = torch.Generator().manual_seed(0)
    z, first, emb = (
        torch.randn(4, 4, 8, 16, generator=g),
        torch.randn(1, 4, 8, 16, generator=g),
        torch.randn(1, 1, 64),
    )
    config = TrainConfig(rank=4, steps=3, seed=1)
    plain = train_clip_lora(host, z, first, emb, config)
    low = train_clip_lora(host, z, first, emb, config, autocast_dtype=torch.bfloat16)
    assert host.lora_branch is not None
    assert all(p.dtype == torch.float32 for _, p in host.lora_branch.named_trainable())
    assert torch.isfinite(torch.tensor(low.losses)).all()
    pairs = [(plain.weights.modules[n], low.weights.modules[n]) for n in plain.weights.modules]
    assert all(b.up.dtype == torch.float32 and b.down.dtype == torch.float32 for _, b in pairs)
    assert any(not torch.equal(a.up, b.up) for a, b in pairs)  # autocast took effect
    # the losses agree to bf16 precision (AdamW's first steps are nearly sign steps, so the LoRA's smallest
    # gradients may step the other way: its weights are compared through the loss, not entry by entry)
    assert low.losses == pytest.approx(plain.losses, rel=1e-2)


def test_matching_scores_stay_fp32_inside_an_autocast_region():
    g = torch.Generator().manual_seed(0)
    q_e, k_e, v_e, q_s, k_s = (torch.randn(3, 48, 32, generator=g) for _ in range(5))
    tau = frame_thresholds(3, (0.3, 0.3))
    plain = spatial_match(q_e, k_e, v_e, q_s, k_s, 2, tau, query_chunk=16)
    with torch.autocast("cpu", torch.bfloat16):
        inside = spatial_match(q_e, k_e, v_e, q_s, k_s, 2, tau, query_chunk=16)
        probs = attention_probs(q_e, k_e, 2)
        assert (q_e @ k_e.transpose(-1, -2)).dtype == torch.bfloat16  # the region is on
    assert probs.dtype == torch.float32
    for a, b in zip(plain, inside):
        assert torch.equal(a, b)


def test_the_inversion_stays_fp32_while_denoising_runs_in_bf16(host, video):
    seen: list[torch.dtype] = []
    lin = host.unet.down_blocks[0].attentions[0].proj_in
    handle = lin.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    frames, edits = video
    try:
        edit_video(host, frames[:4], 8.0, edits, _bf16(lora_steps=0))
    finally:
        handle.remove()
    assert torch.float32 in seen and torch.bfloat16 in seen  # inversion fp32, denoising bf16


def test_dtype_names_and_devices_are_checked(host, video, caplog):
    frames, edits = video
    with pytest.raises(I2VEditError, match="denoising dtype must be one of fp32, bf16, fp16"):
        edit_video(host, frames, 8.0, edits, EditSettings(denoise_dtype="fp8"))  # type: ignore[arg-type]
    with pytest.raises(I2VEditError, match="on CUDA and CPU only"):
        check_device("meta", "bf16")
    check_device("meta", "fp32")
    with caplog.at_level(logging.WARNING, logger="i2vedit"):
        check_device("cpu", "fp16")
    assert "slower than fp32" in caplog.text


def test_the_command_line_auto_dtype():
    assert default_dtype("cpu") == "fp32"
    assert resolve_dtypes("auto", "auto", torch.device("cpu")) == ("fp32", "fp32")
    assert resolve_dtypes("bf16", "auto", torch.device("cpu")) == ("bf16", "bf16")
    assert resolve_dtypes("fp16", "fp32", torch.device("cpu")) == ("fp16", "fp32")
    if torch.cuda.is_available():
        assert default_dtype("cuda") in ("bf16", "fp16")


# --- weights stored in fp16 / bf16 (issue 13) ------------------------------------------------------


def _stored_host(dtype: torch.dtype) -> DiffusersSVDHost:
    return with_stored_weights(build_tiny_diffusers_host(seed=0), dtype)


# measured on the tiny model, 2 clips of 4 frames, 3 steps, 2 LoRA steps (mean, max over the frames on a
# [0, 1] scale): fp16 weights 0.0006 / 0.013, bf16 weights 0.004 / 0.065
@pytest.mark.parametrize(("name", "mean", "most"), [("fp16", 0.003, 0.05), ("bf16", 0.02, 0.2)])
def test_weights_stored_in_half_precision_compute_in_fp32_close_to_fp32_weights(
    video, fp32_run, name, mean, most
):
    dtype = DTYPES[name]
    host = _stored_host(dtype)
    stored = [p for p in host.unet.parameters() if p.dtype == dtype]
    assert {p.dtype for p in host.unet.parameters()} == {dtype, torch.float32}
    assert sum(p.numel() for p in stored) > 0.9 * sum(p.numel() for p in host.unet.parameters())
    seen: list[torch.dtype] = []  # a stored layer's output: computed in fp32
    handle = (
        host.unet.down_blocks[0]
        .attentions[0]
        .proj_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    )
    frames, edits = video
    try:  # the LoRA trains with gradient checkpointing (the default), through stored convolutions
        run = edit_video(
            host, frames, 8.0, edits, EditSettings(**{**SETTINGS.__dict__, "weights_dtype": name})
        )
    finally:
        handle.remove()
    assert seen and set(seen) == {torch.float32}
    assert all(p.dtype == dtype for p in stored)  # stored again after every call
    assert host.lora_branch is not None
    assert all(p.dtype == torch.float32 for _, p in host.lora_branch.named_trainable())
    diff = (run.videos[0] - fp32_run.videos[0]).abs()
    assert torch.isfinite(run.videos[0]).all() and 0 < float(diff.mean()) < mean and float(diff.max()) < most
    assert run.report["dtypes"] == {"weights": name, "denoise": "fp32", "train": "fp32"}


def test_stored_weights_have_their_own_reuse_identity_and_fp32_keeps_the_old_one():
    half = EditSettings(**{**SETTINGS.__dict__, "weights_dtype": "fp16"})
    assert half.identity()["weights_dtype"] == "fp16"
    assert SETTINGS.identity() == {k: v for k, v in half.identity().items() if k != "weights_dtype"}
    assert half.edit_identity() == SETTINGS.edit_identity()  # the folder's identity covers the edits
    with pytest.raises(I2VEditError, match="weights dtype must be one of"):
        EditSettings(weights_dtype="fp8").validate()  # type: ignore[arg-type]


def test_fp32_storage_leaves_the_models_as_they_are(host):
    assert all(store_weights(m, torch.float32) is m for m in (host.unet, host.vae, host.image_encoder))
    assert not any(hasattr(m, "_diffusers_hook") for m in host.unet.modules())  # no casting hook anywhere
    assert host.weights_dtype == torch.float32
    assert {p.dtype for m in (host.unet, host.vae, host.image_encoder) for p in m.parameters()} == {
        torch.float32
    }


def test_the_command_line_auto_weights_dtype():
    assert resolve_weights_dtype("auto", "cpu") == "fp32"
    assert resolve_weights_dtype("auto", torch.device("cuda")) == "fp16"  # by device type: no GPU needed
    assert resolve_weights_dtype("bf16", "cpu") == "bf16"
    with pytest.raises(I2VEditError, match="weights dtype must be one of"):
        resolve_weights_dtype("int8", "cpu")


def test_settings_naming_other_stored_weights_than_the_hosts_are_refused_before_any_compute(video):
    host = _stored_host(torch.float16)
    frames, edits = video
    calls = []
    handle = host.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(
            I2VEditError, match=r"weights_dtype='fp32' but the model's weights are stored in fp16"
        ):
            edit_video(host, frames, 8.0, edits, SETTINGS)  # the fingerprint alone cannot tell fp16 from fp32
    finally:
        handle.remove()
    assert not calls
