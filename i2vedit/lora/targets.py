"""Which linear layers a motion LoRA trains, by module-name rules (method.md §5.1, comfyui.md §1.3).

Two target sets over the 16 temporal transformer blocks of the SVD UNet:

- ``"temporal"`` (the authors' default): in every temporal block ``attn1`` and ``attn2``
  (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) plus the ``ff_in`` and ``ff`` linears
  (``net.0.proj``, ``net.2``). 12 linears per block, 192 in SVD, 17.8 M LoRA parameters at rank 32.
- ``"temporal_attention"``: only the 8 attention projections per block, 128 in SVD.

Names are relative to the UNet, in either of its two namings:

- ``"comfy"`` (ComfyUI / SGM): ``input_blocks.1.1.time_stack.0.attn1.to_q``
- ``"diffusers"``: ``down_blocks.0.attentions.0.temporal_transformer_blocks.0.attn1.to_q``

The rules depend only on the layout, not on widths, so they serve the full model and tiny test
models alike. Plain torch, no model library.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Literal, get_args

import torch

from ..errors import I2VEditError
from ..svd import comfy_to_diffusers_key, diffusers_to_comfy_key

TargetSet = Literal["temporal", "temporal_attention"]
Naming = Literal["comfy", "diffusers"]

TARGET_SETS: tuple[TargetSet, ...] = get_args(TargetSet)
NAMINGS: tuple[Naming, ...] = get_args(Naming)
DEFAULT_TARGET_SET: TargetSet = "temporal"

# Linears inside one temporal block, in the order the authors' code walks them (method.md §5.6).
_ATTENTION_LINEARS = tuple(f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0"))
_FF_IN_LINEARS = ("ff_in.net.0.proj", "ff_in.net.2")
_FF_LINEARS = ("ff.net.0.proj", "ff.net.2")

BLOCK_LINEARS: dict[TargetSet, tuple[str, ...]] = {
    "temporal": _FF_IN_LINEARS + _ATTENTION_LINEARS + _FF_LINEARS,
    "temporal_attention": _ATTENTION_LINEARS,
}
"""The linears each target set trains inside one temporal block, relative to the block."""

# Where the temporal blocks live: the block path (group 1) without the linear's own tail.
_BLOCK_PATTERNS: dict[Naming, str] = {
    "comfy": r"(?:(?:input_blocks|output_blocks)\.\d+\.\d+|middle_block\.\d+)\.time_stack\.\d+",
    "diffusers": (
        r"(?:(?:down_blocks|up_blocks)\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+)"
        r"\.temporal_transformer_blocks\.\d+"
    ),
}


def _tail_pattern(target_set: TargetSet) -> str:
    return "(?:" + "|".join(re.escape(t) for t in BLOCK_LINEARS[target_set]) + ")"


_RULES: dict[tuple[TargetSet, Naming], re.Pattern[str]] = {
    (ts, nm): re.compile(rf"^{_BLOCK_PATTERNS[nm]}\.{_tail_pattern(ts)}$")
    for ts in TARGET_SETS
    for nm in NAMINGS
}
# The same rules without the start anchor: finds names that carry a prefix such as "diffusion_model.".
_PREFIXED_RULES: dict[tuple[TargetSet, Naming], re.Pattern[str]] = {
    key: re.compile(r"\." + rule.pattern[1:]) for key, rule in _RULES.items()
}


def check_target_set(target_set: str) -> TargetSet:
    """Return ``target_set`` if it names a target set, else raise an error listing the valid names."""
    if target_set not in TARGET_SETS:
        raise I2VEditError(
            f"unknown LoRA target set {target_set!r}; use one of {', '.join(map(repr, TARGET_SETS))} "
            "('temporal' is the authors' default: temporal attention and feed-forward layers)."
        )
    return target_set


def check_naming(naming: str) -> Naming:
    """Return ``naming`` if it names a module naming, else raise an error listing the valid names."""
    if naming not in NAMINGS:
        raise I2VEditError(
            f"unknown module naming {naming!r}; use 'comfy' (ComfyUI/SGM names such as "
            "'input_blocks.1.1.time_stack.0.attn1.to_q') or 'diffusers' (names such as "
            "'down_blocks.0.attentions.0.temporal_transformer_blocks.0.attn1.to_q')."
        )
    return naming


def is_target(name: str, target_set: str = DEFAULT_TARGET_SET, naming: str = "comfy") -> bool:
    """Whether the module ``name`` (relative to the UNet, in ``naming``) is trained by ``target_set``."""
    return _RULES[check_target_set(target_set), check_naming(naming)].match(name) is not None


def select_targets(
    module_names: Iterable[str], target_set: str = DEFAULT_TARGET_SET, naming: str = "comfy"
) -> list[str]:
    """The names among ``module_names`` that ``target_set`` trains, sorted.

    Raises instead of returning nothing when the names are clearly given the wrong way: in the other
    naming, or with a prefix such as ``diffusion_model.`` (names must be relative to the UNet).
    """
    ts, nm = check_target_set(target_set), check_naming(naming)
    names = list(module_names)
    rule = _RULES[ts, nm]
    found = sorted(n for n in names if rule.match(n))
    if found or not names:
        return found
    other: Naming = "diffusers" if nm == "comfy" else "comfy"
    other_hits = [n for n in names if _RULES[ts, other].match(n)]
    if other_hits:
        raise I2VEditError(
            f"no module name is in {nm!r} naming, but {len(other_hits)} are in {other!r} naming "
            f"(e.g. {other_hits[0]!r}); pass naming={other!r}."
        )
    prefixed = [n for n in names if _PREFIXED_RULES[ts, nm].search(n) or _PREFIXED_RULES[ts, other].search(n)]
    if prefixed:
        raise I2VEditError(
            f"module names must be relative to the UNet, but they carry a prefix (e.g. {prefixed[0]!r}); "
            "strip everything before 'input_blocks.'/'middle_block.'/'output_blocks.' (ComfyUI) or "
            "'down_blocks.'/'mid_block.'/'up_blocks.' (diffusers), e.g. 'diffusion_model.'."
        )
    return found


def convert_name(name: str, to: str) -> str:
    """Convert a UNet module name to naming ``to`` (``"comfy"`` or ``"diffusers"``).

    A name already in naming ``to`` is returned unchanged. Works for every module with a weight,
    not only LoRA targets (it goes through the state-dict key map).
    """
    dst = check_naming(to)
    src_fn, dst_fn = (
        (comfy_to_diffusers_key, diffusers_to_comfy_key)
        if dst == "diffusers"
        else (diffusers_to_comfy_key, comfy_to_diffusers_key)
    )
    key = f"{name}.weight"
    try:
        dst_fn(key)  # already in the target naming
        return name
    except KeyError:
        pass
    try:
        out = src_fn(key)
    except KeyError:
        raise I2VEditError(
            f"{name!r} is not a module name of the SVD UNet in either naming; give a name relative to "
            "the UNet such as 'input_blocks.1.1.time_stack.0.attn1.to_q' (ComfyUI) or "
            "'down_blocks.0.attentions.0.temporal_transformer_blocks.0.attn1.to_q' (diffusers)."
        ) from None
    return out[: -len(".weight")]


def to_comfy_name(name: str) -> str:
    """The ComfyUI/SGM name of a UNet module given in either naming."""
    return convert_name(name, "comfy")


def to_diffusers_name(name: str) -> str:
    """The diffusers name of a UNet module given in either naming."""
    return convert_name(name, "diffusers")


def target_shapes(
    unet: torch.nn.Module, target_set: str = DEFAULT_TARGET_SET, naming: str = "comfy"
) -> dict[str, tuple[int, int]]:
    """``{name: (out_features, in_features)}`` of the target linears of a UNet module, names sorted.

    ``unet`` is the UNet itself (ComfyUI's ``model.diffusion_model`` or diffusers'
    ``UNetSpatioTemporalConditionModel``) so that names come out relative to it. Works on the meta
    device. Raises when a target name is not a linear layer.
    """
    modules = dict(unet.named_modules())
    out: dict[str, tuple[int, int]] = {}
    for name in select_targets(modules, target_set, naming):
        mod = modules[name]
        weight = getattr(mod, "weight", None)
        if not isinstance(mod, torch.nn.Linear) or weight is None or weight.ndim != 2:
            raise I2VEditError(
                f"LoRA target {name!r} is a {type(mod).__name__}, not a linear layer; "
                "is this the SVD UNet (img2vid / img2vid-xt)?"
            )
        out[name] = (int(weight.shape[0]), int(weight.shape[1]))
    return out


def lora_param_count(module_shapes: Mapping[str, tuple[int, int]], rank: int) -> int:
    """LoRA parameters for ``module_shapes`` ``{name: (out_features, in_features)}`` at ``rank``.

    Each layer gets a down (rank × in) and an up (out × rank) matrix: rank · (in + out).
    """
    if rank < 1:
        raise I2VEditError(f"LoRA rank {rank} is below 1; use a positive rank (the authors use 32).")
    return sum(rank * (int(o) + int(i)) for o, i in module_shapes.values())
