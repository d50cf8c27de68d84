"""The ComfyUI (SGM) ↔ diffusers SVD UNet key map, checked on a full-size diffusers UNet on the meta device."""

import re

import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel

from i2vedit.errors import I2VEditError
from i2vedit.svd import (
    POSITIONS,
    comfy_to_diffusers,
    comfy_to_diffusers_key,
    diffusers_to_comfy,
    diffusers_to_comfy_key,
    strip_prefix,
)


@pytest.fixture(scope="module")
def full_unet():
    with torch.device("meta"):
        return UNetSpatioTemporalConditionModel()  # the default config is SVD's


@pytest.mark.parametrize(
    ("comfy", "diffusers"),
    [
        (
            "input_blocks.1.1.time_stack.0.attn1.to_q.weight",
            "down_blocks.0.attentions.0.temporal_transformer_blocks.0.attn1.to_q.weight",
        ),
        (
            "middle_block.1.transformer_blocks.0.attn1.to_k.weight",
            "mid_block.attentions.0.transformer_blocks.0.attn1.to_k.weight",
        ),
        ("output_blocks.11.1.time_pos_embed.2.bias", "up_blocks.3.attentions.2.time_pos_embed.linear_2.bias"),
        (
            "input_blocks.4.0.skip_connection.weight",
            "down_blocks.1.resnets.0.spatial_res_block.conv_shortcut.weight",
        ),
        (
            "input_blocks.10.0.time_stack.out_layers.3.weight",
            "down_blocks.3.resnets.0.temporal_res_block.conv2.weight",
        ),
        ("input_blocks.9.0.op.weight", "down_blocks.2.downsamplers.0.conv.weight"),
        ("output_blocks.2.1.conv.bias", "up_blocks.0.upsamplers.0.conv.bias"),
        ("output_blocks.8.2.conv.weight", "up_blocks.2.upsamplers.0.conv.weight"),
        ("middle_block.2.time_mixer.mix_factor", "mid_block.resnets.1.time_mixer.mix_factor"),
        ("label_emb.0.2.weight", "add_embedding.linear_2.weight"),
        ("out.2.weight", "conv_out.weight"),
    ],
)
def test_known_names(comfy, diffusers):
    assert comfy_to_diffusers_key(comfy) == diffusers
    assert diffusers_to_comfy_key(diffusers) == comfy


def test_covers_every_tensor_of_full_svd(full_unet):
    sd = full_unet.state_dict()
    comfy_sd = diffusers_to_comfy(sd)
    assert len(comfy_sd) == len(sd) == 1428  # bijective: no two keys collapse
    assert set(comfy_to_diffusers(comfy_sd)) == set(sd)
    for k, v in comfy_sd.items():
        assert v.shape == sd[comfy_to_diffusers_key(k)].shape
    temporal_q = [k for k in comfy_sd if re.search(r"\.time_stack\.0\.attn1\.to_q\.weight$", k)]
    assert sorted(temporal_q) == sorted(p.comfy_temporal + ".to_q.weight" for p in POSITIONS)


def test_full_svd_has_16_spatial_and_16_temporal_self_attention_layers(full_unet):
    from diffusers.models.attention_processor import Attention

    attn = {n: m for n, m in full_unet.named_modules() if isinstance(m, Attention)}
    self_attn = sorted(n for n in attn if n.endswith("attn1"))
    assert len(attn) == 64 and len(self_attn) == 32
    assert self_attn == sorted(
        [p.diffusers_spatial for p in POSITIONS] + [p.diffusers_temporal for p in POSITIONS]
    )
    # Channels and heads per level as in method.md §0.1 (head dim 64 everywhere).
    for p in POSITIONS:
        a = attn[p.diffusers_spatial]
        channels = {1: 320, 2: 640, 4: 1280, 8: 1280}[p.downscale]
        assert a.to_q.in_features == channels and a.heads == channels // 64
    assert [p.downscale for p in POSITIONS] == [1, 1, 2, 2, 4, 4, 8, 4, 4, 4, 2, 2, 2, 1, 1, 1]


def test_prefixes_and_unknown_keys():
    sd = {"model.diffusion_model.out.2.weight": 1, "first_stage_model.x": 2}
    assert strip_prefix(sd) == {"out.2.weight": 1}
    with pytest.raises(I2VEditError, match="not part of an SVD UNet"):
        comfy_to_diffusers(
            {"input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": 0, "cond_stage_model.foo": 0}
        )
