"""The ComfyUI host against a real ComfyUI (COMFYUI_PATH); skipped with the reason when there is none."""

import pytest
import torch
from conftest import align_groupnorm_eps

from i2vedit.errors import NotSVDModelError
from i2vedit.host import cfg_ramp
from i2vedit.method import samplers, schedules
from i2vedit.method.inversion import invert
from i2vedit.method.matching import matched_denoise
from i2vedit.svd import LATENT_SCALE, POSITIONS, SVDCond, TimeIds

pytestmark = pytest.mark.usefixtures("comfy")
F, h, w = 5, 8, 12


@pytest.fixture(scope="module")
def hosts(comfy, tiny_diffusers_host):
    from fixtures.tiny_comfy import build_tiny_comfy_host

    return build_tiny_comfy_host(seed=0, with_vae=True), tiny_diffusers_host


@pytest.fixture(scope="module")
def cond():
    g = torch.Generator().manual_seed(1)
    return SVDCond(
        torch.randn(1, 1, 64, generator=g), torch.randn(1, 4, h, w, generator=g), TimeIds(6, 127, 0.02)
    )


def test_full_size_svd_goes_through_comfy_model_detection(comfy):
    import comfy.model_detection
    import comfy.supported_models
    from diffusers import UNetSpatioTemporalConditionModel
    from fixtures.tiny_comfy import build_svd_patcher

    from i2vedit.svd import comfy_to_diffusers

    patcher = build_svd_patcher(device="meta")
    unet = patcher.model.diffusion_model
    sd = unet.state_dict()
    config = comfy.model_detection.model_config_from_unet(
        {f"model.diffusion_model.{k}": v for k, v in sd.items()}, "model.diffusion_model."
    )
    assert type(config) is comfy.supported_models.SVD_img2vid
    assert sum(v.numel() for v in sd.values()) == 1_524_623_082
    with torch.device("meta"):
        ref = UNetSpatioTemporalConditionModel().state_dict()
    mapped = comfy_to_diffusers(sd)
    assert set(mapped) == set(ref) and all(mapped[k].shape == ref[k].shape for k in ref)
    modules = dict(unet.named_modules())
    attn1 = sorted(
        n for n, m in modules.items() if n.endswith("attn1") and type(m).__name__ == "CrossAttention"
    )
    assert attn1 == sorted([p.comfy_spatial for p in POSITIONS] + [p.comfy_temporal for p in POSITIONS])


def test_detected_full_size_model_gets_16_plus_16_attention_patches_and_lora_targets(comfy):
    """The model ComfyUI builds from a detected full-size SVD checkpoint, as the nodes receive it."""
    import comfy.model_detection
    import comfy.model_patcher
    from fixtures.tiny_comfy import build_svd_patcher

    from i2vedit.hosts.comfy.host import ComfySVDHost
    from i2vedit.lora.targets import lora_param_count, target_shapes

    sd = build_svd_patcher(device="meta").model.diffusion_model.state_dict()
    config = comfy.model_detection.model_config_from_unet(
        {f"model.diffusion_model.{k}": v for k, v in sd.items()}, "model.diffusion_model."
    )
    model = config.get_model({}, device="meta")
    user = comfy.model_patcher.ModelPatcher(model, load_device="cpu", offload_device="cpu")
    controlled = ComfySVDHost(user).controlled_patcher
    replace = controlled.model_options["transformer_options"]["patches_replace"]["attn1"]
    assert sorted(replace) == sorted(p.comfy_patch_key for p in POSITIONS) and len(replace) == 16
    tagged = [k for k in controlled.object_patches if k.endswith("time_stack.0.forward")]
    assert len(tagged) == 16 and not user.object_patches and not user.model_options.get("transformer_options")
    shapes = target_shapes(model.diffusion_model, "temporal", "comfy")
    assert len(shapes) == 192 and lora_param_count(shapes, 32) == 17_821_696


def test_same_denoiser_output_as_diffusers_on_identical_weights(hosts, cond):
    comfy_host, diffusers_host = hosts
    aligned = align_groupnorm_eps(diffusers_host)
    x = torch.randn(F, 4, h, w, generator=torch.Generator().manual_seed(2))
    for sigma in (700.0, 10.0, 0.1):
        conds = [cond.unconditional(), cond]
        ours = comfy_host.denoise(x * max(sigma, 1.0), sigma, conds)
        ref = aligned.denoise(x * max(sigma, 1.0), sigma, conds)
        assert ours.shape == (2, F, 4, h, w)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        # The libraries as shipped differ only by that eps: still close.
        plain = diffusers_host.denoise(x * max(sigma, 1.0), sigma, conds)
        assert (ours - plain).abs().max() < 1e-3 * plain.abs().max()
    assert not torch.allclose(ours[0], ours[1])


def test_same_sampling_as_diffusers_with_per_frame_cfg(hosts, cond):
    comfy_host, diffusers_host = hosts
    aligned = align_groupnorm_eps(diffusers_host)
    x = torch.randn(F, 4, h, w, generator=torch.Generator().manual_seed(3)) * 700
    sig = schedules.denoise_sigmas(3)
    args = (samplers.sample_euler_denoise, x, sig, cond, cond.unconditional(), cfg_ramp(F, 1.0, 2.5))
    torch.testing.assert_close(
        comfy_host.sample(*args, disable=True), aligned.sample(*args, disable=True), rtol=1e-4, atol=1e-4
    )


def test_inversion_and_denoising_run_as_stock_ksamplers(hosts, cond):
    """The samplers ``invert`` and ``matched_denoise`` drive are ComfyUI KSAMPLERs: same latents."""
    import comfy.sample
    import comfy.samplers

    from i2vedit.hosts.comfy.patches import to_conditioning

    comfy_host, _ = hosts
    z0 = torch.randn(F, 4, h, w, generator=torch.Generator().manual_seed(4))
    seen = []

    def recording(fn):
        def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None):
            out = fn(model, x, sigmas, extra_args, callback, disable)
            seen.append(extra_args["model_options"]["transformer_options"]["i2v_phase"])
            return out

        return comfy.samplers.KSAMPLER(sampler)

    def stock(fn, sigmas, start):
        # zero noise: the sampler starts from the LATENT itself (÷ 0.18215 in, × 0.18215 out)
        return LATENT_SCALE * comfy.sample.sample_custom(
            comfy_host.patcher, torch.zeros_like(start), 1.0, recording(fn), sigmas.float(),
            to_conditioning(cond), to_conditioning(cond.unconditional()), start / LATENT_SCALE, disable_pbar=True,
        )  # fmt: skip

    inv = invert(comfy_host, z0, cond, steps=4)
    inverted = stock(samplers.sample_euler_inversion, inv.sigmas, z0)
    # Same path but for the LATENT's ÷/× 0.18215 round trip, which the inversion amplifies a little.
    assert (inverted - inv.x_T).abs().max() < 1e-4 * inv.x_T.abs().max()
    back = matched_denoise(comfy_host, inv, cond, config=None, cfg=None).latents
    denoised = stock(samplers.sample_euler_denoise, inv.denoise_sigmas(), inv.x_T)
    assert (denoised - back).abs().max() < 1e-4 * back.abs().max()
    assert seen == ["invert", "denoise"]


def test_vae_and_clip(hosts):
    comfy_host, _ = hosts
    images = torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    lat = comfy_host.vae_encode(images)
    assert lat.shape == (3, 4, 8, 8)
    a = comfy_host.vae_encode(images, sample=True, generator=torch.Generator().manual_seed(0))
    b = comfy_host.vae_encode(images, sample=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, lat)
    out = comfy_host.vae_decode(lat, chunk=2)
    assert out.shape == (3, 64, 64, 3) and out.min() >= 0 and out.max() <= 1
    assert comfy_host.encode_clip(images[:1]).shape == (1, 1, 64)


def test_a_model_that_is_not_svd_is_rejected(comfy):
    import comfy.model_patcher
    import comfy.supported_models

    from i2vedit.hosts.comfy.host import ComfySVDHost

    sd15 = comfy.supported_models.SD15(
        {"use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
         "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 1],
         "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1, "context_dim": 64,
         "use_linear_in_transformer": False, "adm_in_channels": None, "use_spatial_transformer": True,
         "legacy": False, "num_head_channels": 16, "use_temporal_attention": False, "use_temporal_resblock": False}
    )  # fmt: skip
    patcher = comfy.model_patcher.ModelPatcher(
        sd15.get_model({}, device="meta"), load_device="cpu", offload_device="cpu"
    )
    with pytest.raises(NotSVDModelError, match="not Stable Video Diffusion"):
        ComfySVDHost(patcher)
    with pytest.raises(NotSVDModelError, match="expected a ComfyUI MODEL"):
        ComfySVDHost(torch.nn.Linear(2, 2))
