"""SGM single-file SVD checkpoints (svd.safetensors): key maps, loading, writing, errors; against ComfyUI too."""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
from fixtures.sgm_writer import (
    clip_transformers_to_open_clip,
    sgm_state_dict,
    vae_diffusers_to_sgm,
    write_single_file,
)
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from i2vedit.cli import load_diffusers_host, main
from i2vedit.errors import I2VEditError, ModelFileError, NotSVDModelError
from i2vedit.hosts.diffusers.host import DiffusersSVDHost
from i2vedit.hosts.diffusers.single_file import (
    CLIP_PREFIX,
    SVD_VAE_CONFIG,
    UNET_PREFIX,
    VAE_PREFIX,
    check_single_file,
    clip_open_clip_to_transformers,
    load_single_file,
    vae_sgm_to_diffusers,
)
from i2vedit.hosts.diffusers.tiny import build_tiny_diffusers_host
from i2vedit.io.video import write_video
from i2vedit.svd import SVDCond, TimeIds

VIT_H = {
    "hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 16, "patch_size": 14,
    "image_size": 224, "intermediate_size": 5120, "projection_dim": 1024, "hidden_act": "gelu",
}  # fmt: skip


def _identity_quant_conv(host: DiffusersSVDHost) -> DiffusersSVDHost:
    """The SGM VAE has no quant_conv: with it the identity, a host survives the file exactly."""
    with torch.no_grad():
        n = host.vae.quant_conv.weight.shape[0]
        host.vae.quant_conv.weight.copy_(torch.eye(n)[:, :, None, None])
        host.vae.quant_conv.bias.zero_()
    return host


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    host = _identity_quant_conv(build_tiny_diffusers_host(seed=3))
    path = write_single_file(host, tmp_path_factory.mktemp("sf") / "svd.safetensors")
    return host, path


@pytest.fixture(scope="module")
def full_meta():
    """Full-size SVD UNet, VAE (SVD's config) and ViT-H/14 image encoder on the meta device."""
    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel()  # the default config is SVD's
        vae = AutoencoderKLTemporalDecoder(**SVD_VAE_CONFIG)
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H))
    return unet, vae, clip


def _outputs(host: DiffusersSVDHost) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(3, 32, 48, 3, generator=g)
    clip = host.encode_clip(frames[:1])
    latent = host.vae_encode(frames)
    cond = SVDCond(clip, latent[:1], TimeIds(6, 127, 0.02))
    x = torch.randn(3, 4, 4, 6, generator=g)
    return [clip, latent, host.vae_decode(latent), host.denoise(x, 2.0, [cond])]


def _sd_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    different = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert different == []


# --- always: round trips and the SGM layout ---------------------------------------------------


def test_tiny_host_survives_write_and_load_exactly(tiny_file):
    host, path = tiny_file
    loaded = load_single_file(path, device="cpu")
    assert isinstance(loaded, DiffusersSVDHost)
    for a, b in (
        (host.unet, loaded.unet),
        (host.vae, loaded.vae),
        (host.image_encoder, loaded.image_encoder),
    ):
        _sd_equal(a, b)
    assert tuple(loaded.unet.config.num_attention_heads) == tuple(host.unet.config.num_attention_heads)
    assert loaded.image_encoder.config.hidden_act == host.image_encoder.config.hidden_act == "quick_gelu"
    assert loaded.image_encoder.config.num_attention_heads == host.image_encoder.config.num_attention_heads
    for mine, theirs in zip(_outputs(loaded), _outputs(host)):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    params = [t for m in (loaded.unet, loaded.vae, loaded.image_encoder) for t in m.state_dict().values()]
    buffers = [b for m in (loaded.unet, loaded.vae, loaded.image_encoder) for b in m.buffers()]
    assert not any(t.is_meta for t in params + buffers)


def test_written_file_has_sgm_names_and_this_packs_metadata(tiny_file):
    _, path = tiny_file
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "conditioner"}
    assert f"{UNET_PREFIX}input_blocks.1.0.time_stack.in_layers.2.weight" in keys
    assert f"{VAE_PREFIX}decoder.conv_out.time_mix_conv.weight" in keys
    assert f"{CLIP_PREFIX}transformer.resblocks.1.attn.in_proj_weight" in keys
    assert not any("quant_conv" in k or "vision_model" in k for k in keys)
    assert meta["i2vedit.format"] == "i2vedit.svd_sgm"
    assert meta["i2vedit.unet_attention_heads"] == "2,4,8,8"
    assert meta["i2vedit.clip_hidden_act"] == "quick_gelu"


def test_quant_conv_is_folded_into_the_encoder_and_loads_as_identity(tmp_path, tiny_diffusers_host):
    host = tiny_diffusers_host  # random quant_conv
    assert not torch.equal(host.vae.quant_conv.weight[:, :, 0, 0], torch.eye(8))
    first = load_single_file(write_single_file(host, tmp_path / "a.safetensors"), device="cpu")
    torch.testing.assert_close(first.vae.quant_conv.weight[:, :, 0, 0], torch.eye(8), rtol=0, atol=0)
    frames = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(first.vae_encode(frames), host.vae_encode(frames), rtol=1e-5, atol=1e-6)
    second = load_single_file(write_single_file(first, tmp_path / "b.safetensors"), device="cpu")
    _sd_equal(first.vae, second.vae)  # a fixed point once folded


def test_loads_in_the_requested_unet_dtype(tiny_file):
    _, path = tiny_file
    host = load_single_file(path, dtype=torch.bfloat16, device="cpu")
    assert next(host.unet.parameters()).dtype == torch.bfloat16 and host.dtype == torch.bfloat16
    assert next(host.vae.parameters()).dtype == torch.float32
    assert next(host.image_encoder.parameters()).dtype == torch.float32


def _expected_sgm_vae_keys(ch=(128, 256, 512, 512), layers=2) -> dict[str, tuple[int, ...]]:
    """The SGM SVD VAE's tensors, written out from its layout (LDM Encoder + temporal VideoDecoder)."""
    out: dict[str, tuple[int, ...]] = {}

    def conv(name, o, i, k=3):
        out[f"{name}.weight"], out[f"{name}.bias"] = (o, i, k, k), (o,)

    def norm(name, c):
        out[f"{name}.weight"], out[f"{name}.bias"] = (c,), (c,)

    def res(name, i, o, video=False):
        (
            norm(f"{name}.norm1", i),
            conv(f"{name}.conv1", o, i),
            norm(f"{name}.norm2", o),
            conv(f"{name}.conv2", o, o),
        )
        if i != o:
            conv(f"{name}.nin_shortcut", o, i, 1)
        if video:
            out[f"{name}.mix_factor"] = (1,)
            for part in ("in_layers.0", "out_layers.0"):
                norm(f"{name}.time_stack.{part}", o)
            for part in ("in_layers.2", "out_layers.3"):
                out[f"{name}.time_stack.{part}.weight"], out[f"{name}.time_stack.{part}.bias"] = (
                    (o, o, 3, 1, 1),
                    (o,),
                )

    def attn(name, c):
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    conv("encoder.conv_in", ch[0], 3)
    prev = ch[0]
    for i, c in enumerate(ch):
        for j in range(layers):
            res(f"encoder.down.{i}.block.{j}", prev if j == 0 else c, c)
        prev = c
        if i < len(ch) - 1:
            conv(f"encoder.down.{i}.downsample.conv", c, c)
    res("encoder.mid.block_1", ch[-1], ch[-1]), attn("encoder.mid.attn_1", ch[-1])
    res("encoder.mid.block_2", ch[-1], ch[-1]), norm("encoder.norm_out", ch[-1])
    conv("encoder.conv_out", 8, ch[-1])
    conv("decoder.conv_in", ch[-1], 4)
    res("decoder.mid.block_1", ch[-1], ch[-1], True), attn("decoder.mid.attn_1", ch[-1])
    res("decoder.mid.block_2", ch[-1], ch[-1], True)
    prev = ch[-1]
    for i in reversed(range(len(ch))):
        for j in range(layers + 1):
            res(f"decoder.up.{i}.block.{j}", prev if j == 0 else ch[i], ch[i], True)
        prev = ch[i]
        if i > 0:
            conv(f"decoder.up.{i}.upsample.conv", ch[i], ch[i])
    norm("decoder.norm_out", ch[0]), conv("decoder.conv_out", 3, ch[0])
    out["decoder.conv_out.time_mix_conv.weight"], out["decoder.conv_out.time_mix_conv.bias"] = (
        (3, 3, 3, 1, 1),
        (3,),
    )
    return out


def _expected_open_clip_keys(hidden=1280, layers=32, mlp=5120, proj=1024, patch=14, grid=16):
    out = {
        "class_embedding": (hidden,), "positional_embedding": (grid * grid + 1, hidden), "proj": (hidden, proj),
        "conv1.weight": (hidden, 3, patch, patch),
        **{f"{ln}.{p}": (hidden,) for ln in ("ln_pre", "ln_post") for p in ("weight", "bias")},
    }  # fmt: skip
    for n in range(layers):
        b = f"transformer.resblocks.{n}."
        out.update({b + f"{ln}.{p}": (hidden,) for ln in ("ln_1", "ln_2") for p in ("weight", "bias")})
        out.update({b + "attn.in_proj_weight": (3 * hidden, hidden), b + "attn.in_proj_bias": (3 * hidden,)})
        out.update({b + "attn.out_proj.weight": (hidden, hidden), b + "attn.out_proj.bias": (hidden,)})
        out.update({b + "mlp.c_fc.weight": (mlp, hidden), b + "mlp.c_fc.bias": (mlp,)})
        out.update({b + "mlp.c_proj.weight": (hidden, mlp), b + "mlp.c_proj.bias": (hidden,)})
    return out


def test_full_size_svd_maps_to_exactly_the_sgm_key_set(full_meta):
    unet, vae, clip = full_meta
    sd = sgm_state_dict(unet, vae, clip)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    vae_part = {k[len(VAE_PREFIX) :]: s for k, s in shapes.items() if k.startswith(VAE_PREFIX)}
    clip_part = {k[len(CLIP_PREFIX) :]: s for k, s in shapes.items() if k.startswith(CLIP_PREFIX)}
    assert vae_part == _expected_sgm_vae_keys()
    assert len(vae_part) == 372
    assert clip_part == _expected_open_clip_keys()
    unet_part = [k for k in shapes if k.startswith(UNET_PREFIX)]
    assert len(unet_part) == len(unet.state_dict()) and len(shapes) == len(unet_part) + 372 + len(clip_part)
    for key, shape in {
        "model.diffusion_model.input_blocks.1.0.time_stack.in_layers.2.weight": (320, 320, 3, 1, 1),
        "model.diffusion_model.label_emb.0.0.weight": (1280, 768),
        "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "conditioner.embedders.0.open_clip.model.visual.transformer.resblocks.31.attn.in_proj_weight": (
            3840,
            1280,
        ),
        "conditioner.embedders.0.open_clip.model.visual.proj": (1280, 1024),
    }.items():
        assert shapes[key] == shape, key
    # and back: the loader's maps give exactly the diffusers/transformers tensors
    back_vae = vae_sgm_to_diffusers(
        {k[len(VAE_PREFIX) :]: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
    )
    assert {k: tuple(v.shape) for k, v in back_vae.items()} == {
        k: tuple(v.shape) for k, v in vae.state_dict().items()
    }
    back_clip = clip_open_clip_to_transformers(
        {k[len(CLIP_PREFIX) :]: v for k, v in sd.items() if k.startswith(CLIP_PREFIX)}
    )
    assert {k: tuple(v.shape) for k, v in back_clip.items()} == {
        k: tuple(v.shape) for k, v in clip.state_dict().items()
    }


def test_clip_map_splits_qkv_and_transposes_the_projection():
    g = torch.Generator().manual_seed(0)
    in_proj = torch.randn(24, 8, generator=g)
    proj = torch.randn(8, 5, generator=g)
    hf = clip_open_clip_to_transformers(
        {"transformer.resblocks.0.attn.in_proj_weight": in_proj, "proj": proj}
    )
    base = "vision_model.encoder.layers.0.self_attn."
    assert torch.equal(hf[base + "q_proj.weight"], in_proj[:8])
    assert torch.equal(hf[base + "k_proj.weight"], in_proj[8:16])
    assert torch.equal(hf[base + "v_proj.weight"], in_proj[16:])
    assert torch.equal(hf["visual_projection.weight"], proj.t())
    back = clip_transformers_to_open_clip(hf)
    assert back.keys() == {"transformer.resblocks.0.attn.in_proj_weight", "proj"}
    assert torch.equal(back["transformer.resblocks.0.attn.in_proj_weight"], in_proj)
    assert torch.equal(back["proj"], proj)


def test_vae_attention_convs_become_linears_and_back():
    w = torch.randn(32, 32, 1, 1)
    sd = vae_sgm_to_diffusers({"decoder.mid.attn_1.q.weight": w, "encoder.conv_out.bias": torch.zeros(8)})
    assert torch.equal(sd["decoder.mid_block.attentions.0.to_q.weight"], w[:, :, 0, 0])
    assert torch.equal(sd["quant_conv.weight"][:, :, 0, 0], torch.eye(8))
    back = vae_diffusers_to_sgm({"decoder.mid_block.attentions.0.to_q.weight": w[:, :, 0, 0]})
    assert torch.equal(back["decoder.mid.attn_1.q.weight"], w)


def test_comfyui_saved_clip_names_load_too(tmp_path, tiny_file):
    """ComfyUI's checkpoint saver writes the image encoder with transformers names under the prefix."""
    host, path = tiny_file
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    tensors = {k: v for k, v in tensors.items() if not k.startswith(CLIP_PREFIX)}
    tensors.update({CLIP_PREFIX + k: v for k, v in host.image_encoder.state_dict().items()})
    save_file(tensors, str(tmp_path / "comfy_saved.safetensors"), metadata=meta)
    loaded = load_single_file(tmp_path / "comfy_saved.safetensors", device="cpu")
    _sd_equal(loaded.image_encoder, host.image_encoder)


# --- always: errors ---------------------------------------------------------------------------


class _Payload:
    """Unpickling this would create a marker file: proof that a loader unpickled it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("zipfile", [True, False])
def test_pickle_checkpoint_is_refused_without_unpickling(tmp_path, zipfile):
    marker = tmp_path / "unpickled"
    path = tmp_path / "svd.safetensors"
    torch.save({"state_dict": _Payload(marker)}, path, _use_new_zipfile_serialization=zipfile)
    for fn in (load_single_file, check_single_file):
        with pytest.raises(ModelFileError, match=r"pickle checkpoint.*not opened"):
            fn(path)
    assert not marker.exists()


def test_damaged_or_missing_file_is_named(tmp_path):
    bad = tmp_path / "svd.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ModelFileError, match=r"not a readable safetensors single file"):
        load_single_file(bad)
    with pytest.raises(ModelFileError, match=r"no model file at"):
        load_single_file(tmp_path / "absent.safetensors")


def _sd15_like() -> dict[str, torch.Tensor]:
    return {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": torch.zeros(8, 8),
        "first_stage_model.decoder.conv_in.weight": torch.zeros(8, 4, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(10, 8),
    }


def test_image_model_checkpoint_is_refused_as_not_svd(tmp_path):
    path = tmp_path / "sd15.safetensors"
    save_file(_sd15_like(), str(path))
    with pytest.raises(
        NotSVDModelError, match=r"not a Stable Video Diffusion.*no temporal layers.*image-only SVD"
    ):
        load_single_file(path)


def _tiny_sgm(tiny_file) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    _, path = tiny_file
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def test_unet_only_file_names_the_missing_parts(tmp_path, tiny_file):
    sd, _ = _tiny_sgm(tiny_file)
    path = tmp_path / "unet_only.safetensors"
    save_file({k: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}, str(path))
    with pytest.raises(
        ModelFileError, match=r"UNet only.*the VAE \(first_stage_model.*the image encoder \(cond"
    ):
        load_single_file(path)
    save_file({k: v for k, v in sd.items() if not k.startswith(CLIP_PREFIX)}, str(path))
    with pytest.raises(
        ModelFileError, match=r"not a whole SVD checkpoint: it lacks the image encoder \(cond"
    ) as e:
        check_single_file(path)
    assert "first_stage_model" not in str(e.value)


def test_vae_only_file_is_not_an_svd_checkpoint(tmp_path, tiny_file):
    sd, _ = _tiny_sgm(tiny_file)
    path = tmp_path / "vae.safetensors"
    save_file({k: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}, str(path))
    with pytest.raises(NotSVDModelError, match=r"holds a VAE only"):
        load_single_file(path)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("drop", "first_stage_model.decoder.up.1.block.1.conv1.weight"),
        (
            "drop",
            "conditioner.embedders.0.open_clip.model.visual.transformer.resblocks.1.attn.in_proj_weight",
        ),
        ("drop", "model.diffusion_model.output_blocks.4.1.time_stack.0.attn1.to_q.weight"),
        ("add", "model.diffusion_model.input_blocks.1.0.extra.weight"),
        ("add", "first_stage_model.decoder.up.1.block.2.conv1.weight"),
        ("add", "stray.tensor"),
        ("reshape", "first_stage_model.decoder.conv_out.time_mix_conv.weight"),
    ],
)
def test_missing_extra_or_misshapen_keys_are_named(tmp_path, tiny_file, change, named):
    sd, meta = _tiny_sgm(tiny_file)
    if change == "drop":
        del sd[named]
    elif change == "add":
        sd[named] = torch.zeros(2, 2)
    else:
        sd[named] = torch.zeros(3, 3, 5, 1, 1)
    path = tmp_path / "svd.safetensors"
    save_file(sd, str(path), metadata=meta)
    with pytest.raises(ModelFileError, match=re.escape(named)):
        load_single_file(path, device="cpu")


def test_known_extra_sgm_keys_are_not_read(tmp_path, tiny_file):
    """Real svd.safetensors also holds the text tower's leftovers and embedder 3's VAE copy."""
    host, _ = tiny_file
    sd, meta = _tiny_sgm(tiny_file)
    sd["conditioner.embedders.0.open_clip.model.logit_scale"] = torch.ones(())
    sd["conditioner.embedders.3.encoder.encoder.conv_in.weight"] = torch.zeros(4, 3, 3, 3)
    path = tmp_path / "svd.safetensors"
    save_file(sd, str(path), metadata=meta)
    _sd_equal(load_single_file(path, device="cpu").vae, host.vae)


def test_a_vae_the_library_cannot_build_is_named(tmp_path, tiny_file):
    """16-channel levels cannot take diffusers' 32-group norms: said, not a bare torch error."""
    sd, meta = _tiny_sgm(tiny_file)
    sd = {k: v for k, v in sd.items() if not k.startswith(VAE_PREFIX)}
    sd.update({VAE_PREFIX + k: torch.zeros(s) for k, s in _expected_sgm_vae_keys((16,) * 4, 1).items()})
    path = tmp_path / "svd.safetensors"
    save_file(sd, str(path), metadata=meta)
    with pytest.raises(ModelFileError, match=r"the VAE its tensor shapes describe .*cannot be built"):
        load_single_file(path, device="cpu")


def test_malformed_metadata_is_named(tmp_path, tiny_file):
    sd, meta = _tiny_sgm(tiny_file)
    path = tmp_path / "svd.safetensors"
    save_file(sd, str(path), metadata={**meta, "i2vedit.unet_attention_heads": "two"})
    with pytest.raises(ModelFileError, match=r"i2vedit.unet_attention_heads.*'two'"):
        load_single_file(path)


def test_without_metadata_svd_head_widths_are_assumed(tmp_path, tiny_file):
    """Tiny widths (32) are no multiple of 64-wide heads (SVD, open_clip): without the metadata that is said."""
    sd, _ = _tiny_sgm(tiny_file)
    path = tmp_path / "svd.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ModelFileError, match=r"not a multiple of the assumed head width 64"):
        load_single_file(path)


def test_write_refuses_another_suffix(tmp_path, tiny_file):
    host, _ = tiny_file
    with pytest.raises(ModelFileError, match=r"\.safetensors"):
        write_single_file(host, tmp_path / "svd.ckpt")


# --- always: the command line -----------------------------------------------------------------


def _edit_args(tmp_path, model) -> list[str]:
    import cv2

    video, frame = tmp_path / "v.mp4", tmp_path / "f.png"
    write_video(video, torch.rand(3, 64, 64, 3), 8.0)
    cv2.imwrite(str(frame), (torch.rand(64, 64, 3) * 255).byte().numpy())
    return ["edit", "--video", str(video), "--first-frame", str(frame), "--model", str(model), "--out", str(tmp_path / "o")]  # fmt: skip


def test_cli_refuses_a_non_svd_single_file_clearly(tmp_path, capsys):
    sd15 = tmp_path / "sd15.safetensors"
    save_file(_sd15_like(), str(sd15))
    assert main(_edit_args(tmp_path, sd15)) == 2
    assert "not a Stable Video Diffusion checkpoint" in capsys.readouterr().err
    ckpt = tmp_path / "svd.ckpt"
    ckpt.write_bytes(b"\x80\x04K\x01.")
    assert main(_edit_args(tmp_path, ckpt)) == 2
    assert "single file but not .safetensors" in capsys.readouterr().err
    assert main(_edit_args(tmp_path, tmp_path)) == 2
    assert "not a diffusers SVD folder" in capsys.readouterr().err


def test_cli_loads_a_single_file_into_a_working_host(tiny_file):
    host, path = tiny_file
    loaded = load_diffusers_host(path)
    assert isinstance(loaded, DiffusersSVDHost)
    rtol, atol = (1e-5, 1e-6) if loaded.device.type == "cpu" else (1e-2, 1e-3)  # CUDA: TF32 convolutions
    for mine, theirs in zip(_outputs(loaded), _outputs(host)):
        torch.testing.assert_close(mine.cpu(), theirs, rtol=rtol, atol=atol)
    with pytest.raises(I2VEditError, match="is not a file"):
        load_single_file(path.parent)


# --- with ComfyUI -----------------------------------------------------------------------------


def _random_like(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Every tensor random (biases, norms and mix factors too) at a scale that keeps activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        r = torch.randn(v.shape, generator=g)
        if v.ndim >= 2:
            out[k] = r / (v[0].numel() ** 0.5)
        elif k.endswith("mix_factor"):
            out[k] = r
        elif k.endswith(".weight"):  # norms
            out[k] = 1 + 0.1 * r
        else:
            out[k] = 0.1 * r
    return out


@pytest.mark.usefixtures("comfy")
def test_clip_conversion_matches_comfyui(full_meta):
    from comfy.clip_vision import convert_to_transformers

    prefix = "cond.visual."
    small = _random_like(
        {k: torch.zeros(s) for k, s in _expected_open_clip_keys(48, 3, 96, 40, 8, 4).items()}, seed=5
    )
    theirs = convert_to_transformers({prefix + k: v.clone() for k, v in small.items()}, prefix)
    mine = clip_open_clip_to_transformers(small)
    assert set(mine) == set(theirs)
    assert [k for k in mine if not torch.equal(mine[k], theirs[k])] == []
    # full size (meta): ComfyUI's names and shapes for a ViT-H/14 written by us are transformers' own
    _, _, clip = full_meta
    ours = clip_transformers_to_open_clip(clip.state_dict())
    converted = convert_to_transformers({CLIP_PREFIX + k: v for k, v in ours.items()}, CLIP_PREFIX)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in clip.state_dict().items()
    }


@pytest.mark.usefixtures("comfy")
def test_vae_matches_comfyui_full_width():
    from fixtures.tiny_comfy import build_svd_vae

    engine = build_svd_vae(seed=0).first_stage_model.eval()
    sgm = _random_like(engine.state_dict(), seed=7)
    engine.load_state_dict(sgm)
    with torch.device("meta"):
        ref = AutoencoderKLTemporalDecoder(**SVD_VAE_CONFIG)
    assert _expected_sgm_vae_keys() == {k: tuple(v.shape) for k, v in sgm.items()}
    assert set(vae_diffusers_to_sgm(ref.state_dict())) == set(sgm)
    vae = AutoencoderKLTemporalDecoder(**SVD_VAE_CONFIG).eval()
    vae.load_state_dict(vae_sgm_to_diffusers(sgm), strict=True)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    z = torch.randn(2, 4, 4, 4, generator=g)
    with torch.no_grad():
        enc_mine, enc_theirs = vae.encode(pixels).latent_dist.mode(), engine.encode(pixels)
        dec_mine, dec_theirs = vae.decode(z, num_frames=2).sample, engine.decode(z)  # one batch = one video
    for mine, theirs in ((enc_mine, enc_theirs), (dec_mine, dec_theirs)):
        assert theirs.abs().mean() > 1e-2  # not a degenerate comparison
        assert (mine - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    # the temporal parts matter: another mix factor changes the decoded frames
    with torch.no_grad():
        vae.decoder.up_blocks[0].resnets[0].time_mixer.mix_factor.add_(2.0)
        assert (vae.decode(z, num_frames=2).sample - dec_theirs).abs().max() > 1e-3 * dec_theirs.abs().max()


@pytest.mark.usefixtures("comfy")
def test_written_files_go_through_comfyui_detection(full_meta, tiny_file):
    import comfy.model_detection
    import comfy.supported_models
    import comfy.utils
    from fixtures.tiny_comfy import build_svd_patcher

    from i2vedit.hosts.diffusers import tiny

    sd = sgm_state_dict(*full_meta)
    assert comfy.model_detection.unet_prefix_from_state_dict(sd) == UNET_PREFIX
    config = comfy.model_detection.model_config_from_unet(sd, UNET_PREFIX)
    assert type(config) is comfy.supported_models.SVD_img2vid
    assert config.clip_vision_prefix == CLIP_PREFIX
    vae_sd = comfy.utils.state_dict_prefix_replace(sd, {VAE_PREFIX: ""}, filter_keys=True)
    assert "decoder.mid.block_1.mix_factor" in vae_sd  # what ComfyUI's VAE takes as SVD's temporal decoder

    _, path = tiny_file
    file_sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    detected = comfy.model_detection.detect_unet_config(file_sd, UNET_PREFIX)
    svd = comfy.supported_models.SVD_img2vid.unet_config
    assert {k: detected[k] for k in svd if k not in ("model_channels", "context_dim")} == {
        k: v for k, v in svd.items() if k not in ("model_channels", "context_dim")
    }
    assert (detected["model_channels"], detected["context_dim"]) == (tiny.MODEL_CHANNELS, tiny.CONTEXT_DIM)
    unet = build_svd_patcher(tiny.MODEL_CHANNELS, tiny.CONTEXT_DIM, tiny.HEAD_DIM, device="cpu").model
    part = comfy.utils.state_dict_prefix_replace(file_sd, {UNET_PREFIX: ""}, filter_keys=True)
    missing, unexpected = unet.diffusion_model.load_state_dict(part, strict=False)
    assert missing == [] and unexpected == []
