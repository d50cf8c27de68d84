"""The SVD contract every part shares: latents, conditioning, the 16+16 attention layers, the key map.

- Latents: sampling latents are raw VAE latents × ``LATENT_SCALE`` (frames, 4, h, w), one video
  per tensor with frames on the batch axis, as in ComfyUI's LATENT.
- Conditioning (``SVDCond``): the CLIP image embedding as a one-token context, a raw VAE latent
  concatenated to every frame's input channels, and the micro-conditioning ``TimeIds``.
- Positions (method.md §0.1): 16 transformer positions, each holding one spatial and one temporal
  self-attention layer, in forward order (also ComfyUI's ``transformer_index``), named for both
  model libraries.
- Key map: pure string rules between ComfyUI's (SGM) UNet state-dict keys and diffusers'
  ``UNetSpatioTemporalConditionModel``. Keys are relative to the UNet itself: ComfyUI's
  ``diffusion_model.`` / single-file checkpoints' ``model.diffusion_model.`` prefix is stripped by
  the caller (``strip_prefix``). The layout is SVD's: 4 levels with 2 res blocks each, attention at
  the first three down levels, the middle and the last three up levels; channel counts are free,
  so the same map serves the full model and the tiny test models.

No model library is imported here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TypeVar

import torch

from .errors import I2VEditError

LATENT_SCALE = 0.18215
COND, UNCOND = "cond", "uncond"


@dataclass(frozen=True)
class TimeIds:
    """SVD's micro-conditioning, as the values its embedding sees.

    ``fps_id`` is diffusers' convention (frames per second minus one; ComfyUI's ``fps`` field is
    this plus one). The paper's code uses 8 for inversion, 6 for training and output_fps − 1 for
    denoising; SVD's default is 6.
    """

    fps_id: float = 6.0
    motion_bucket_id: float = 127.0
    noise_aug: float = 0.02

    def as_list(self) -> list[float]:
        return [float(self.fps_id), float(self.motion_bucket_id), float(self.noise_aug)]


@dataclass(frozen=True)
class SVDCond:
    """Conditioning of one CFG branch.

    ``clip_embed`` is (1, 1, D), the CLIP image embedding used as a one-token context;
    ``concat_latent`` is (1 or F, 4, h, w) raw VAE latents concatenated to the input channels of
    every frame (one latent is repeated over all frames).
    """

    clip_embed: torch.Tensor
    concat_latent: torch.Tensor
    time_ids: TimeIds = TimeIds()
    kind: str = COND

    def unconditional(self) -> SVDCond:
        """The branch SVD's CFG uses as negative: zero embedding and zero latent, same ids."""
        return replace(
            self,
            clip_embed=torch.zeros_like(self.clip_embed),
            concat_latent=torch.zeros_like(self.concat_latent),
            kind=UNCOND,
        )

    def check(self, x: torch.Tensor) -> None:
        """Raise a clear error if this conditioning cannot go with latents ``x``."""
        if self.clip_embed.ndim != 3 or self.clip_embed.shape[:2] != (1, 1):
            raise I2VEditError(
                f"clip_embed must be (1, 1, D), got {tuple(self.clip_embed.shape)}; encode one image."
            )
        lat = self.concat_latent
        if lat.ndim != 4 or lat.shape[1] != x.shape[1] or lat.shape[2:] != x.shape[2:]:
            raise I2VEditError(
                f"conditioning latent {tuple(lat.shape)} does not fit the video latents "
                f"{tuple(x.shape)}; encode the first frame at the video's resolution."
            )
        if lat.shape[0] not in (1, x.shape[0]):
            raise I2VEditError(
                f"conditioning latent has {lat.shape[0]} frames but the video has {x.shape[0]}; "
                "give one latent (repeated over frames) or one per frame."
            )


@dataclass(frozen=True)
class AttentionPosition:
    """One transformer position: where its two self-attention layers live in each library."""

    index: int  # 0..15 in forward order
    level: str  # "down", "mid" or "up"
    pos: int  # counter within the level (down 0-5, mid 0, up 0-8)
    downscale: int  # latent resolution divided by this: 1, 2, 4 or 8
    diffusers_prefix: str
    comfy_prefix: str
    comfy_patch_key: tuple[str, int, int]  # key of ComfyUI's attn1 replace patches

    @property
    def diffusers_spatial(self) -> str:
        return f"{self.diffusers_prefix}.transformer_blocks.0.attn1"

    @property
    def diffusers_temporal(self) -> str:
        return f"{self.diffusers_prefix}.temporal_transformer_blocks.0.attn1"

    @property
    def comfy_spatial(self) -> str:
        return f"{self.comfy_prefix}.transformer_blocks.0.attn1"

    @property
    def comfy_temporal(self) -> str:
        return f"{self.comfy_prefix}.time_stack.0.attn1"


def _build() -> tuple[AttentionPosition, ...]:
    out: list[AttentionPosition] = []
    for block in range(3):  # down_blocks.0-2 carry attention; down_blocks.3 does not
        for j in range(2):
            comfy_id = 3 * block + j + 1
            out.append(
                AttentionPosition(
                    len(out),
                    "down",
                    2 * block + j,
                    2**block,
                    f"down_blocks.{block}.attentions.{j}",
                    f"input_blocks.{comfy_id}.1",
                    ("input", comfy_id, 0),
                )
            )
    out.append(
        AttentionPosition(len(out), "mid", 0, 8, "mid_block.attentions.0", "middle_block.1", ("middle", 0, 0))
    )
    for block in range(1, 4):  # up_blocks.0 has no attention
        for j in range(3):
            comfy_id = 3 * block + j
            out.append(
                AttentionPosition(
                    len(out),
                    "up",
                    3 * (block - 1) + j,
                    2 ** (3 - block),
                    f"up_blocks.{block}.attentions.{j}",
                    f"output_blocks.{comfy_id}.1",
                    ("output", comfy_id, 0),
                )
            )
    return tuple(out)


POSITIONS: tuple[AttentionPosition, ...] = _build()


T = TypeVar("T")

_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_RES_PARTS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_SVT_PARTS = {
    "time_stack.0": "temporal_transformer_blocks.0",
    "time_pos_embed.0": "time_pos_embed.linear_1",
    "time_pos_embed.2": "time_pos_embed.linear_2",
}


def _block_prefixes() -> dict[str, tuple[str, str]]:
    """SGM module prefix → (diffusers prefix, kind) for every UNet sub-block."""
    out: dict[str, tuple[str, str]] = {}
    for level in range(4):
        for j in range(2):
            sgm_id = 3 * level + j + 1
            out[f"input_blocks.{sgm_id}.0"] = (f"down_blocks.{level}.resnets.{j}", "res")
            if level < 3:
                out[f"input_blocks.{sgm_id}.1"] = (f"down_blocks.{level}.attentions.{j}", "svt")
        if level < 3:
            out[f"input_blocks.{3 * level + 3}.0.op"] = (f"down_blocks.{level}.downsamplers.0.conv", "plain")
    out["middle_block.0"] = ("mid_block.resnets.0", "res")
    out["middle_block.1"] = ("mid_block.attentions.0", "svt")
    out["middle_block.2"] = ("mid_block.resnets.1", "res")
    for level in range(4):
        for j in range(3):
            sgm_id = 3 * level + j
            out[f"output_blocks.{sgm_id}.0"] = (f"up_blocks.{level}.resnets.{j}", "res")
            if level > 0:
                out[f"output_blocks.{sgm_id}.1"] = (f"up_blocks.{level}.attentions.{j}", "svt")
        if level < 3:
            up_slot = 1 if level == 0 else 2
            out[f"output_blocks.{3 * level + 2}.{up_slot}.conv"] = (
                f"up_blocks.{level}.upsamplers.0.conv",
                "plain",
            )
    return out


_BLOCKS = _block_prefixes()
_BLOCK_RE = re.compile(
    r"^((?:input_blocks|output_blocks)\.\d+\.\d+(?:\.op|\.conv)?|middle_block\.\d+)\.(.+)$"
)


def _map_res_rest(rest: str) -> str:
    if rest.startswith("time_mixer."):
        return rest
    if rest.startswith("time_stack."):
        sub, inner = "temporal_res_block", rest[len("time_stack.") :]
    else:
        sub, inner = "spatial_res_block", rest
    for sgm, dif in _RES_PARTS.items():
        if inner.startswith(sgm + "."):
            return f"{sub}.{dif}{inner[len(sgm) :]}"
    raise KeyError(rest)


def _map_svt_rest(rest: str) -> str:
    for sgm, dif in _SVT_PARTS.items():
        if rest.startswith(sgm + "."):
            return dif + rest[len(sgm) :]
    return rest  # norm, proj_in, proj_out, transformer_blocks.0.*, time_mixer.*: same names


def comfy_to_diffusers_key(key: str) -> str:
    """Map one SGM/ComfyUI UNet key (no ``diffusion_model.`` prefix) to its diffusers name."""
    for sgm, dif in _TOP.items():
        if key.startswith(sgm + "."):
            return dif + key[len(sgm) :]
    m = _BLOCK_RE.match(key)
    if m is None:
        raise KeyError(key)
    prefix, rest = m.group(1), m.group(2)
    # "input_blocks.3.0.op.weight" matches with prefix "input_blocks.3.0" + rest "op.weight" first.
    if prefix not in _BLOCKS and prefix + "." + rest.split(".")[0] in _BLOCKS:
        head, _, rest = rest.partition(".")
        prefix = f"{prefix}.{head}"
    if prefix not in _BLOCKS:
        raise KeyError(key)
    dif_prefix, kind = _BLOCKS[prefix]
    if kind == "res":
        return f"{dif_prefix}.{_map_res_rest(rest)}"
    if kind == "svt":
        return f"{dif_prefix}.{_map_svt_rest(rest)}"
    return f"{dif_prefix}.{rest}"


def _invert_pairs(pairs: Mapping[str, str]) -> dict[str, str]:
    return {v: k for k, v in pairs.items()}


_TOP_INV = _invert_pairs(_TOP)
_RES_INV = _invert_pairs(_RES_PARTS)
_SVT_INV = _invert_pairs(_SVT_PARTS)
_BLOCKS_INV = {dif: (sgm, kind) for sgm, (dif, kind) in _BLOCKS.items()}
_DIF_BLOCK_RE = re.compile(
    r"^((?:down_blocks|up_blocks)\.\d+\.(?:resnets|attentions|downsamplers|upsamplers)\.\d+(?:\.conv)?"
    r"|mid_block\.(?:resnets|attentions)\.\d+)\.(.+)$"
)


def diffusers_to_comfy_key(key: str) -> str:
    """Map one diffusers UNet key to its SGM/ComfyUI name (no ``diffusion_model.`` prefix)."""
    for dif, sgm in _TOP_INV.items():
        if key.startswith(dif + "."):
            return sgm + key[len(dif) :]
    m = _DIF_BLOCK_RE.match(key)
    if m is None or m.group(1) not in _BLOCKS_INV:
        raise KeyError(key)
    sgm_prefix, kind = _BLOCKS_INV[m.group(1)]
    rest = m.group(2)
    if kind == "res":
        if rest.startswith("time_mixer."):
            return f"{sgm_prefix}.{rest}"
        sub, _, inner = rest.partition(".")
        head = {"spatial_res_block": "", "temporal_res_block": "time_stack."}.get(sub)
        if head is None:
            raise KeyError(key)
        for dif, sgm in _RES_INV.items():
            if inner.startswith(dif + "."):
                return f"{sgm_prefix}.{head}{sgm}{inner[len(dif) :]}"
        raise KeyError(key)
    if kind == "svt":
        for dif, sgm in _SVT_INV.items():
            if rest.startswith(dif + "."):
                return f"{sgm_prefix}.{sgm}{rest[len(dif) :]}"
        return f"{sgm_prefix}.{rest}"
    return f"{sgm_prefix}.{rest}"


def strip_prefix(
    state_dict: Mapping[str, T], prefixes: tuple[str, ...] = ("model.diffusion_model.", "diffusion_model.")
) -> dict[str, T]:
    """Keep the UNet keys of a ComfyUI model or single-file checkpoint, without their prefix."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def _convert(state_dict: Mapping[str, T], fn, direction: str) -> dict[str, T]:
    out: dict[str, T] = {}
    unknown: list[str] = []
    for k, v in state_dict.items():
        try:
            out[fn(k)] = v
        except KeyError:
            unknown.append(k)
    if unknown:
        raise I2VEditError(
            f"{len(unknown)} keys are not part of an SVD UNet ({direction}), e.g. {unknown[:3]}; "
            "is this an SVD (img2vid / img2vid-xt) model?"
        )
    return out


def comfy_to_diffusers(state_dict: Mapping[str, T]) -> dict[str, T]:
    """Rename a ComfyUI/SGM SVD UNet state dict (prefix stripped) to diffusers names."""
    return _convert(state_dict, comfy_to_diffusers_key, "ComfyUI → diffusers")


def diffusers_to_comfy(state_dict: Mapping[str, T]) -> dict[str, T]:
    """Rename a diffusers SVD UNet state dict to ComfyUI/SGM names (no prefix)."""
    return _convert(state_dict, diffusers_to_comfy_key, "diffusers → ComfyUI")
