"""Motion-LoRA target rules, checked on a full-size diffusers SVD UNet (meta device) and the tiny one."""

import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel

from i2vedit.errors import I2VEditError
from i2vedit.lora.targets import (
    BLOCK_LINEARS,
    DEFAULT_TARGET_SET,
    TARGET_SETS,
    check_naming,
    check_target_set,
    convert_name,
    is_target,
    lora_param_count,
    select_targets,
    target_shapes,
    to_comfy_name,
    to_diffusers_name,
)
from i2vedit.svd import POSITIONS, diffusers_to_comfy


@pytest.fixture(scope="module")
def full_unet():
    with torch.device("meta"):
        return UNetSpatioTemporalConditionModel()  # the default config is SVD's


@pytest.fixture(scope="module")
def full_comfy_names(full_unet):
    """Every module name with a weight in ComfyUI naming, from the key-mapped meta state dict."""
    keys = diffusers_to_comfy(full_unet.state_dict())
    return sorted({k[: -len(".weight")] for k in keys if k.endswith(".weight")})


def test_target_sets_and_default():
    assert TARGET_SETS == ("temporal", "temporal_attention")
    assert DEFAULT_TARGET_SET == "temporal"
    assert len(BLOCK_LINEARS["temporal"]) == 12 and len(BLOCK_LINEARS["temporal_attention"]) == 8
    assert set(BLOCK_LINEARS["temporal_attention"]) < set(BLOCK_LINEARS["temporal"])


@pytest.mark.parametrize(
    ("name", "naming", "temporal", "attention"),
    [
        ("input_blocks.1.1.time_stack.0.attn1.to_q", "comfy", True, True),
        ("middle_block.1.time_stack.0.attn2.to_out.0", "comfy", True, True),
        ("output_blocks.11.1.time_stack.0.attn2.to_k", "comfy", True, True),
        ("input_blocks.1.1.time_stack.0.ff_in.net.0.proj", "comfy", True, False),
        ("input_blocks.1.1.time_stack.0.ff_in.net.2", "comfy", True, False),
        ("output_blocks.3.1.time_stack.0.ff.net.0.proj", "comfy", True, False),
        ("output_blocks.3.1.time_stack.0.ff.net.2", "comfy", True, False),
        # not targets: spatial blocks, norms, containers, GEGLU wrapper, res-block time stacks
        ("input_blocks.1.1.transformer_blocks.0.attn1.to_q", "comfy", False, False),
        ("input_blocks.1.1.time_stack.0.norm1", "comfy", False, False),
        ("input_blocks.1.1.time_stack.0.attn1.to_out", "comfy", False, False),
        ("input_blocks.1.1.time_stack.0.attn1.to_out.1", "comfy", False, False),
        ("input_blocks.1.1.time_stack.0.ff_in.net.0", "comfy", False, False),
        ("input_blocks.1.0.time_stack.in_layers.2", "comfy", False, False),
        ("input_blocks.1.1.time_pos_embed.0", "comfy", False, False),
        ("diffusion_model.input_blocks.1.1.time_stack.0.attn1.to_q", "comfy", False, False),
        ("input_blocks.1.1.time_stack.0.attn1.to_q.weight", "comfy", False, False),
        ("down_blocks.0.attentions.0.temporal_transformer_blocks.0.attn1.to_q", "comfy", False, False),
        ("down_blocks.0.attentions.0.temporal_transformer_blocks.0.attn1.to_q", "diffusers", True, True),
        ("mid_block.attentions.0.temporal_transformer_blocks.0.ff_in.net.2", "diffusers", True, False),
        ("up_blocks.3.attentions.2.temporal_transformer_blocks.0.ff.net.0.proj", "diffusers", True, False),
        ("up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_q", "diffusers", False, False),
        ("input_blocks.1.1.time_stack.0.attn1.to_q", "diffusers", False, False),
    ],
)
def test_is_target(name, naming, temporal, attention):
    assert is_target(name, "temporal", naming) is temporal
    assert is_target(name, "temporal_attention", naming) is attention


def test_unknown_target_set_and_naming_are_refused_with_the_valid_names():
    with pytest.raises(
        I2VEditError, match=r"unknown LoRA target set 'spatial'.*'temporal'.*'temporal_attention'"
    ):
        is_target("input_blocks.1.1.time_stack.0.attn1.to_q", "spatial")
    with pytest.raises(I2VEditError, match=r"unknown module naming 'sgm'.*'comfy'.*'diffusers'"):
        select_targets([], "temporal", "sgm")
    assert check_target_set("temporal_attention") == "temporal_attention"
    assert check_naming("diffusers") == "diffusers"


def test_full_svd_has_192_temporal_and_128_attention_targets(full_unet):
    names = [n for n, _ in full_unet.named_modules()]
    temporal = select_targets(names, "temporal", "diffusers")
    attention = select_targets(names, "temporal_attention", "diffusers")
    assert len(temporal) == 192 and len(attention) == 128
    assert temporal == sorted(temporal) and set(attention) < set(temporal)
    # The rules pick exactly the linears of the temporal transformer blocks.
    linears = {
        n
        for n, m in full_unet.named_modules()
        if isinstance(m, torch.nn.Linear) and ".temporal_transformer_blocks." in n
    }
    assert set(temporal) == linears
    for pos in POSITIONS:
        block = pos.diffusers_prefix + ".temporal_transformer_blocks.0."
        assert sum(t.startswith(block) for t in temporal) == 12
        assert sum(t.startswith(block) for t in attention) == 8


def test_full_svd_lora_parameter_counts(full_unet):
    shapes = target_shapes(full_unet, "temporal", "diffusers")
    assert len(shapes) == 192
    assert shapes["down_blocks.0.attentions.0.temporal_transformer_blocks.0.ff_in.net.0.proj"] == (2560, 320)
    assert shapes["down_blocks.0.attentions.0.temporal_transformer_blocks.0.ff_in.net.2"] == (320, 1280)
    assert shapes["mid_block.attentions.0.temporal_transformer_blocks.0.attn2.to_k"] == (1280, 1024)
    # method.md §5.1: 17.82 M LoRA parameters at rank 32, i.e. sum of r·(in + out).
    assert lora_param_count(shapes, 32) == sum(32 * (o + i) for o, i in shapes.values()) == 17_821_696
    attention = target_shapes(full_unet, "temporal_attention", "diffusers")
    assert len(attention) == 128 and lora_param_count(attention, 32) == 6_639_616
    # The 128 projections themselves hold 99.9 M parameters (comfyui.md §1.3).
    assert round(sum(o * i for o, i in attention.values()) / 1e6, 1) == 99.9


def test_lora_param_count_rejects_a_rank_below_1():
    assert lora_param_count({"a": (4, 3), "b": (2, 5)}, 2) == 2 * 7 + 2 * 7
    with pytest.raises(I2VEditError, match="rank 0 is below 1"):
        lora_param_count({"a": (4, 3)}, 0)


def test_names_convert_between_namings_and_round_trip(full_unet, full_comfy_names):
    dif = select_targets([n for n, _ in full_unet.named_modules()], "temporal", "diffusers")
    comfy = [to_comfy_name(n) for n in dif]
    assert len(set(comfy)) == 192
    assert all(is_target(n, "temporal", "comfy") for n in comfy)
    assert [to_diffusers_name(n) for n in comfy] == dif
    # The ComfyUI names are modules of the (key-mapped) full UNet, and exactly its targets.
    assert set(comfy) <= set(full_comfy_names)
    assert select_targets(full_comfy_names, "temporal", "comfy") == sorted(comfy)
    assert len(select_targets(full_comfy_names, "temporal_attention", "comfy")) == 128
    # One block's names match svd.POSITIONS.
    for pos in POSITIONS:
        assert to_comfy_name(pos.diffusers_temporal + ".to_q") == pos.comfy_temporal + ".to_q"


def test_convert_name_examples_and_errors():
    c = "input_blocks.1.1.time_stack.0.ff_in.net.0.proj"
    d = "down_blocks.0.attentions.0.temporal_transformer_blocks.0.ff_in.net.0.proj"
    assert convert_name(c, "diffusers") == d and convert_name(d, "comfy") == c
    assert convert_name(c, "comfy") == c and convert_name(d, "diffusers") == d  # already there
    assert to_comfy_name("up_blocks.3.attentions.2.temporal_transformer_blocks.0.attn2.to_out.0") == (
        "output_blocks.11.1.time_stack.0.attn2.to_out.0"
    )
    with pytest.raises(I2VEditError, match="not a module name of the SVD UNet"):
        to_comfy_name("text_model.encoder.layers.0.mlp.fc1")
    with pytest.raises(I2VEditError, match="unknown module naming"):
        convert_name(c, "kohya")


def test_select_targets_says_when_names_are_given_the_wrong_way(full_comfy_names):
    assert select_targets([]) == []
    assert select_targets(["input_blocks.1.1.transformer_blocks.0.attn1.to_q"]) == []
    with pytest.raises(I2VEditError, match=r"in 'comfy' naming.*pass naming='comfy'"):
        select_targets(full_comfy_names, "temporal", "diffusers")
    prefixed = ["diffusion_model." + n for n in full_comfy_names]
    with pytest.raises(I2VEditError, match=r"relative to the UNet.*diffusion_model\."):
        select_targets(prefixed, "temporal", "comfy")


def test_target_shapes_refuses_a_target_name_that_is_not_linear():
    root = torch.nn.Module()
    node = root
    for part in ("input_blocks", "1", "1", "time_stack", "0", "attn1"):
        child = torch.nn.Module()
        node.add_module(part, child)
        node = child
    node.add_module("to_q", torch.nn.Conv1d(4, 4, 1))
    node.add_module("to_k", torch.nn.Linear(4, 6))
    with pytest.raises(I2VEditError, match=r"attn1\.to_q' is a Conv1d, not a linear layer"):
        target_shapes(root, "temporal", "comfy")
    del node.to_q
    assert target_shapes(root) == {"input_blocks.1.1.time_stack.0.attn1.to_k": (6, 4)}


def test_tiny_svd_has_the_same_192_targets_at_any_width(tiny_diffusers_host, full_unet):
    tiny = target_shapes(tiny_diffusers_host.unet, "temporal", "diffusers")
    full = target_shapes(full_unet, "temporal", "diffusers")
    assert list(tiny) == list(full)  # same names, in the same (sorted) order
    assert len(target_shapes(tiny_diffusers_host.unet, "temporal_attention", "diffusers")) == 128
    assert all(tiny[n][0] <= full[n][0] and tiny[n][1] <= full[n][1] for n in tiny)
    assert tiny != full
    assert lora_param_count(tiny, 32) < lora_param_count(full, 32)
