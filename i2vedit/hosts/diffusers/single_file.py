"""Single-file SVD checkpoints (Stability's SGM layout, what ComfyUI users have) ↔ the diffusers host.

``svd.safetensors`` / ``svd_xt.safetensors`` hold three models under three key prefixes:

- ``model.diffusion_model.``: the UNet, renamed by the key map in ``svd`` to diffusers'
  ``UNetSpatioTemporalConditionModel``;
- ``first_stage_model.``: the VAE, an LDM encoder and a temporal ``VideoDecoder``, renamed here to
  diffusers' ``AutoencoderKLTemporalDecoder`` (attention 1×1 convs become linears; the SGM VAE has no
  ``quant_conv``, so it loads as the identity);
- ``conditioner.embedders.0.open_clip.model.visual.``: the open_clip ViT image encoder, converted
  here to transformers' ``CLIPVisionModelWithProjection`` (fused ``in_proj`` split into q/k/v,
  ``proj`` transposed). ComfyUI's own checkpoint saver writes this part with transformers names
  under the same prefix; both spellings load.

The rest of ``conditioner.`` (the text tower's leftovers and embedder 3's copy of the VAE, which
ComfyUI leaves unused too) and ``model_ema.`` are not read. Any other key is refused by name, as
are missing keys and wrong shapes: every tensor of the three models comes from the file.

Files are read with ``safetensors.safe_open`` only; a pickle checkpoint is refused unopened. The
model configurations come from the tensor shapes. What shapes cannot tell is read from this
pack's metadata when this pack wrote the file (``i2vedit.*`` keys), else SVD's values are assumed:

- UNet attention heads: head width 64 (SVD's ``num_head_channels``), so 5, 10, 20, 20 heads;
- CLIP attention heads: head width 80 for width 1280 (open_clip ViT-H/14), else 64 (open_clip's
  default ``head_width``); activation ``gelu``, LayerNorm eps 1e-5 (open_clip's);
- three micro-conditioning ids (fps, motion bucket, noise augmentation), so the added-time
  embedding width is a third of ``label_emb``'s input (768 / 3 = 256 for SVD).

This module imports diffusers, transformers and safetensors, never ComfyUI.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ...errors import I2VEditError, ModelFileError, NotSVDModelError
from ...io.files import looks_pickled
from ...svd import comfy_to_diffusers_key, diffusers_to_comfy_key

if TYPE_CHECKING:
    from .host import DiffusersSVDHost

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "conditioner.embedders.0.open_clip.model.visual."
IGNORED_PREFIXES = ("conditioner.", "model_ema.")  # outside CLIP_PREFIX: not part of the three models

FORMAT_TAG = "i2vedit.svd_sgm"
_META = "i2vedit."
_M_FORMAT = _META + "format"
_M_UNET_HEADS = _META + "unet_attention_heads"
_M_CLIP_HEADS = _META + "clip_attention_heads"
_M_CLIP_ACT = _META + "clip_hidden_act"

UNET_HEAD_DIM = 64  # SVD's num_head_channels
_OPEN_CLIP_HEAD_WIDTH = {1280: 80}  # ViT-H/14; open_clip's default head_width is 64
MICRO_CONDITIONING_IDS = 3  # fps, motion bucket, noise augmentation
# stabilityai/stable-video-diffusion-img2vid image_encoder/config.json (OpenCLIP ViT-H/14)
SVD_CLIP_CONFIG: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 1024,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}
SVD_VAE_CONFIG: dict[str, Any] = {  # stabilityai/stable-video-diffusion-img2vid vae/config.json
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 768,
}

_MAX_LISTED = 6
_HELP = (
    "Give Stability's svd.safetensors or svd_xt.safetensors (the files ComfyUI's Image Only "
    "Checkpoint Loader reads) or a diffusers SVD folder (unet/, vae/, image_encoder/)."
)


def _listed(names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


# ---------------------------------------------------------------------------------------------
# VAE: SGM encoder + VideoDecoder  ↔  diffusers AutoencoderKLTemporalDecoder (keys without prefix)
# ---------------------------------------------------------------------------------------------

_RES_2D = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}
_RES_VIDEO = {
    "mix_factor": "time_mixer.mix_factor",
    "time_stack.in_layers.0": "temporal_res_block.norm1",
    "time_stack.in_layers.2": "temporal_res_block.conv1",
    "time_stack.out_layers.0": "temporal_res_block.norm2",
    "time_stack.out_layers.3": "temporal_res_block.conv2",
    **{sgm: f"spatial_res_block.{dif}" for sgm, dif in _RES_2D.items()},
}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_TOP = {  # whole-module renames, checked before the block rules
    "encoder.conv_in": "encoder.conv_in",
    "encoder.norm_out": "encoder.conv_norm_out",
    "encoder.conv_out": "encoder.conv_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.norm_out": "decoder.conv_norm_out",
    "decoder.conv_out.time_mix_conv": "decoder.time_conv_out",
    "decoder.conv_out": "decoder.conv_out",
}
_VAE_TOP_INV = {dif: sgm for sgm, dif in _VAE_TOP.items()}


def _parts(rest: str, table: Mapping[str, str]) -> str:
    """Rename the leading module of ``rest`` (e.g. ``nin_shortcut.weight``) by ``table``."""
    for src in sorted(table, key=len, reverse=True):
        if rest == src or rest.startswith(src + "."):
            return table[src] + rest[len(src) :]
    raise KeyError(rest)


_Rules = list[tuple[re.Pattern[str], Callable[[re.Match[str]], str], Mapping[str, str]]]


def _vae_rules(levels: int) -> _Rules:
    """SGM block regex → (diffusers block prefix, part table); the decoder's ``up`` list is reversed."""

    def up(m: re.Match[str]) -> int:
        return levels - 1 - int(m.group(1))

    return [
        (re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\.(.+)$"),
         lambda m: f"encoder.down_blocks.{m.group(1)}.resnets.{m.group(2)}", _RES_2D),
        (re.compile(r"^encoder\.down\.(\d+)\.downsample\.conv\.(.+)$"),
         lambda m: f"encoder.down_blocks.{m.group(1)}.downsamplers.0.conv", {}),
        (re.compile(r"^encoder\.mid\.block_([12])\.(.+)$"),
         lambda m: f"encoder.mid_block.resnets.{int(m.group(1)) - 1}", _RES_2D),
        (re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(.+)$"),
         lambda m: f"{m.group(1)}.mid_block.attentions.0", _ATTN),
        (re.compile(r"^decoder\.mid\.block_([12])\.(.+)$"),
         lambda m: f"decoder.mid_block.resnets.{int(m.group(1)) - 1}", _RES_VIDEO),
        (re.compile(r"^decoder\.up\.(\d+)\.block\.(\d+)\.(.+)$"),
         lambda m: f"decoder.up_blocks.{up(m)}.resnets.{m.group(2)}", _RES_VIDEO),
        (re.compile(r"^decoder\.up\.(\d+)\.upsample\.conv\.(.+)$"),
         lambda m: f"decoder.up_blocks.{up(m)}.upsamplers.0.conv", {}),
    ]  # fmt: skip


def _vae_rules_inv(levels: int) -> _Rules:
    """The inverse of ``_vae_rules``: diffusers block regex → (SGM block prefix, part table)."""

    def up(m: re.Match[str]) -> int:
        return levels - 1 - int(m.group(1))

    def inv(table: Mapping[str, str]) -> dict[str, str]:
        return {dif: sgm for sgm, dif in table.items()}

    return [
        (re.compile(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$"),
         lambda m: f"encoder.down.{m.group(1)}.block.{m.group(2)}", inv(_RES_2D)),
        (re.compile(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$"),
         lambda m: f"encoder.down.{m.group(1)}.downsample.conv", {}),
        (re.compile(r"^encoder\.mid_block\.resnets\.([01])\.(.+)$"),
         lambda m: f"encoder.mid.block_{int(m.group(1)) + 1}", inv(_RES_2D)),
        (re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)$"),
         lambda m: f"{m.group(1)}.mid.attn_1", inv(_ATTN)),
        (re.compile(r"^decoder\.mid_block\.resnets\.([01])\.(.+)$"),
         lambda m: f"decoder.mid.block_{int(m.group(1)) + 1}", inv(_RES_VIDEO)),
        (re.compile(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$"),
         lambda m: f"decoder.up.{up(m)}.block.{m.group(2)}", inv(_RES_VIDEO)),
        (re.compile(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)$"),
         lambda m: f"decoder.up.{up(m)}.upsample.conv", {}),
    ]  # fmt: skip


def _rename(key: str, top: Mapping[str, str], rules: _Rules) -> str:
    for src in sorted(top, key=len, reverse=True):
        if key.startswith(src + "."):
            return top[src] + key[len(src) :]
    for pattern, prefix, table in rules:
        m = pattern.match(key)
        if m is not None:
            rest = m.group(m.lastindex or 0)
            return f"{prefix(m)}.{_parts(rest, table) if table else rest}"
    raise KeyError(key)


def vae_sgm_to_diffusers_key(key: str, levels: int = 4) -> str:
    """One SGM VAE key (no ``first_stage_model.``) → its diffusers name; ``levels`` resolutions."""
    return _rename(key, _VAE_TOP, _vae_rules(levels))


def vae_diffusers_to_sgm_key(key: str, levels: int = 4) -> str:
    """One diffusers ``AutoencoderKLTemporalDecoder`` key → its SGM name (no prefix)."""
    if key.startswith("quant_conv."):
        raise KeyError(f"{key} has no SGM counterpart (folded into encoder.conv_out)")
    return _rename(key, _VAE_TOP_INV, _vae_rules_inv(levels))


def _is_attn_linear(dif_key: str) -> bool:
    return ".mid_block.attentions.0.to_" in dif_key and dif_key.endswith(".weight")


def _vae_levels(keys: Iterable[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _n_keys(n: int) -> str:
    return f"{n} key" if n == 1 else f"{n} keys"


def _convert_all(
    sd: Mapping[str, Tensor], fn: Callable[[str], str], what: str, name_prefix: str = ""
) -> dict[str, Tensor]:
    """Rename every key by ``fn``; keys it does not know are an error naming them (with ``name_prefix``)."""
    out: dict[str, Tensor] = {}
    unknown = []
    for k, v in sd.items():
        try:
            out[fn(k)] = v
        except KeyError:
            unknown.append(name_prefix + k)
    if unknown:
        raise ModelFileError(
            f"{_n_keys(len(unknown))} not part of an SVD {what}: {_listed(sorted(unknown))}."
        )
    return out


def vae_sgm_to_diffusers(sd: Mapping[str, Tensor], name_prefix: str = "") -> dict[str, Tensor]:
    """An SGM SVD VAE state dict (prefix stripped) as ``AutoencoderKLTemporalDecoder`` tensors.

    Attention 1×1 conv weights become linear weights and ``quant_conv``, which the SGM VAE lacks,
    is the identity. Raises ``ModelFileError`` naming (after ``name_prefix``) keys that are not
    part of such a VAE.
    """
    levels = _vae_levels(sd, r"^decoder\.up\.(\d+)\.")
    out = _convert_all(sd, lambda k: vae_sgm_to_diffusers_key(k, levels), "VAE", name_prefix)
    for k, v in out.items():
        if _is_attn_linear(k) and v.ndim == 4:
            out[k] = v[:, :, 0, 0]
    if "encoder.conv_out.bias" in out:
        ref = out["encoder.conv_out.bias"]
        n = ref.shape[0]
        out["quant_conv.weight"] = torch.eye(n, dtype=ref.dtype, device=ref.device)[:, :, None, None]
        out["quant_conv.bias"] = torch.zeros(n, dtype=ref.dtype, device=ref.device)
    return out


# ---------------------------------------------------------------------------------------------
# Image encoder: open_clip VisionTransformer ↔ transformers CLIPVisionModelWithProjection
# ---------------------------------------------------------------------------------------------

_CLIP_TOP = {
    "class_embedding": "vision_model.embeddings.class_embedding",
    "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "ln_post.weight": "vision_model.post_layernorm.weight",
    "ln_post.bias": "vision_model.post_layernorm.bias",
    "proj": "visual_projection.weight",  # transposed: open_clip computes x @ proj
}
_CLIP_TOP_INV = {hf: oc for oc, hf in _CLIP_TOP.items()}
_CLIP_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_CLIP_BLOCK_INV = {hf: oc for oc, hf in _CLIP_BLOCK.items()}
_QKV = ("q_proj", "k_proj", "v_proj")
_OC_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)$")


def clip_open_clip_to_transformers(sd: Mapping[str, Tensor], name_prefix: str = "") -> dict[str, Tensor]:
    """open_clip visual tensors (prefix stripped) as ``CLIPVisionModelWithProjection`` tensors.

    The fused ``attn.in_proj_weight`` / ``in_proj_bias`` split into q, k, v projections (in that
    order) and ``proj`` is transposed. Raises ``ModelFileError`` naming (after ``name_prefix``)
    keys of any other kind.
    """
    out: dict[str, Tensor] = {}
    unknown = []
    for k, v in sd.items():
        if k in _CLIP_TOP:
            out[_CLIP_TOP[k]] = v.t().contiguous() if k == "proj" else v
            continue
        m = _OC_BLOCK.match(k)
        if m is None:
            unknown.append(k)
            continue
        layer, rest = m.group(1), m.group(2)
        base = f"vision_model.encoder.layers.{layer}."
        fused = re.fullmatch(r"attn\.in_proj_(weight|bias)", rest)
        if fused:
            for name, part in zip(_QKV, v.chunk(3, dim=0)):
                out[f"{base}self_attn.{name}.{fused.group(1)}"] = part
            continue
        try:
            out[base + _parts(rest, _CLIP_BLOCK)] = v
        except KeyError:
            unknown.append(k)
    if unknown:
        raise ModelFileError(
            f"{_n_keys(len(unknown))} not part of an open_clip ViT image encoder: "
            f"{_listed(sorted(name_prefix + k for k in unknown))}."
        )
    return out


def _clip_file_name(hf_key: str, hf_format: bool) -> str:
    """Where a transformers CLIP key lives in a single file (for error messages)."""
    if hf_format:
        return CLIP_PREFIX + hf_key
    if hf_key in _CLIP_TOP_INV:
        return CLIP_PREFIX + _CLIP_TOP_INV[hf_key]
    m = _HF_BLOCK.match(hf_key)
    if m is not None:
        rest = m.group(2)
        split = re.fullmatch(r"self_attn\.(?:q|k|v)_proj\.(weight|bias)", rest)
        with_rest = f"attn.in_proj_{split.group(1)}" if split else None
        if with_rest is None:
            try:
                with_rest = _parts(rest, _CLIP_BLOCK_INV)
            except KeyError:
                with_rest = rest
        return f"{CLIP_PREFIX}transformer.resblocks.{m.group(1)}.{with_rest}"
    return CLIP_PREFIX + hf_key


def _refuse_pickle(p: Path) -> None:
    if looks_pickled(p):
        raise ModelFileError(
            f"{p} is a PyTorch pickle checkpoint (torch.save / .ckpt), not safetensors; it was not opened, "
            "because unpickling can run arbitrary code. " + _HELP
        )


def _open_header(p: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Key → shape and the metadata, from the file header only (no tensor is read)."""
    if not p.exists():
        raise ModelFileError(f"no model file at {p}; check the path. " + _HELP)
    if not p.is_file():
        raise ModelFileError(f"{p} is not a file. " + _HELP)
    _refuse_pickle(p)
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            names = list(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in names}
            meta = dict(f.metadata() or {})
    except SafetensorError as e:
        raise ModelFileError(
            f"{p} is not a readable safetensors single file ({e}); it may be truncated or damaged "
            "(an interrupted download or copy?). " + _HELP
        ) from e
    except OSError as e:
        raise ModelFileError(f"cannot read {p} ({e}); check that the file is readable.") from e
    return shapes, meta


def _check_layout(p: Path, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse, by the key names alone, files that are not a whole image-to-video SVD checkpoint."""
    keys = list(shapes)
    unet = [k for k in keys if k.startswith(UNET_PREFIX)]
    has_vae = any(k.startswith(VAE_PREFIX) for k in keys)
    has_clip = any(k.startswith(CLIP_PREFIX) for k in keys)
    temporal = any(".time_stack." in k or ".time_mixer." in k for k in unet)
    if unet and not temporal:
        kind = "its UNet has no temporal layers (time_stack / time_mixer)"
        if not has_clip:
            kind += (
                " and it has no open_clip image encoder (conditioner.embedders.0.open_clip.model.visual.*)"
            )
        raise NotSVDModelError(
            f"{p} is not a Stable Video Diffusion checkpoint: {kind}. It looks like an image model "
            "(SD 1.x / 2.x / SDXL). An image-only SVD checkpoint (image-to-video) is needed. " + _HELP
        )
    if not unet:
        what = "a VAE only" if has_vae and not has_clip else "no model.diffusion_model.* UNet"
        if not keys:
            what = "no tensors"
        elif not has_vae and not has_clip:
            what = (
                "none of the SVD parts (model.diffusion_model.*, first_stage_model.*, "
                f"{CLIP_PREFIX}*); a diffusers or other single model file?"
            )
        raise NotSVDModelError(f"{p} is not an SVD checkpoint: it holds {what}. " + _HELP)
    label = f"{UNET_PREFIX}label_emb.0.0.weight"
    if label in shapes and (len(shapes[label]) != 2 or shapes[label][1] % MICRO_CONDITIONING_IDS):
        raise NotSVDModelError(
            f"{p} is a video model but not SVD image-to-video: its micro-conditioning input has width "
            f"{shapes[label][-1]}, not 3 × 256 (fps, motion bucket, noise augmentation), e.g. SV3D. " + _HELP
        )
    missing = []
    if not has_vae:
        missing.append("the VAE (first_stage_model.*)")
    if not has_clip:
        missing.append(f"the image encoder ({CLIP_PREFIX}*)")
    if missing:
        held = "holds the SVD UNet only" if len(missing) == 2 else "is not a whole SVD checkpoint"
        raise ModelFileError(
            f"{p} {held}: it lacks {' and '.join(missing)}. The command line needs the whole image-only "
            "SVD checkpoint. " + _HELP
        )
    stray = sorted(
        k for k in keys if not k.startswith((UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX, *IGNORED_PREFIXES))
    )
    if stray:
        raise ModelFileError(
            f"{p} has {_n_keys(len(stray))} that are not part of an SVD checkpoint: {_listed(stray)}. "
            "Was it merged or converted by another tool? " + _HELP
        )


def check_single_file(path: str | os.PathLike) -> Path:
    """Refuse, from the header alone (seconds, no weights read), a file ``load_single_file`` cannot load."""
    p = Path(path)
    shapes, _ = _open_header(p)
    _check_layout(p, shapes)
    return p


def _int_meta(meta: Mapping[str, str], key: str, p: Path) -> tuple[int, ...] | None:
    if key not in meta:
        return None
    try:
        values = tuple(int(x) for x in meta[key].split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise ModelFileError(
            f"{p}: metadata {key!r} is {meta[key]!r}, not positive integers; the file was edited or "
            "damaged. Write it again, or remove that metadata entry to use SVD's values."
        )
    return values


# --- configs from shapes -----------------------------------------------------------------------


def _need(sd: Mapping[str, Tensor], key: str, name: Callable[[str], str]) -> Tensor:
    if key not in sd:
        raise KeyError(name(key))
    return sd[key]


def unet_config_from_state_dict(
    sd: Mapping[str, Tensor], heads: tuple[int, ...] | None = None
) -> dict[str, Any]:
    """``UNetSpatioTemporalConditionModel`` arguments from a diffusers-named UNet state dict."""
    name = lambda k: UNET_PREFIX + diffusers_to_comfy_key(k)  # noqa: E731
    channels = tuple(
        _need(sd, f"down_blocks.{i}.resnets.0.spatial_res_block.conv1.weight", name).shape[0]
        for i in range(4)
    )
    if heads is None:
        if any(c % UNET_HEAD_DIM for c in channels):
            raise ModelFileError(
                f"UNet widths {channels} are not multiples of the assumed head width {UNET_HEAD_DIM} (SVD's); this is "
                "not an SVD UNet, or it needs its head counts (record them in the file's i2vedit.unet_attention_heads metadata)."
            )
        heads = tuple(c // UNET_HEAD_DIM for c in channels)
    if len(heads) != 4 or any(c % h for c, h in zip(channels, heads)):
        raise ModelFileError(f"UNet head counts {heads} do not divide the widths {channels}.")
    time_in = _need(sd, "add_embedding.linear_1.weight", name).shape[1]
    return {
        "in_channels": _need(sd, "conv_in.weight", name).shape[1],
        "out_channels": _need(sd, "conv_out.weight", name).shape[0],
        "block_out_channels": channels,
        "addition_time_embed_dim": time_in // MICRO_CONDITIONING_IDS,
        "projection_class_embeddings_input_dim": time_in,
        "layers_per_block": 2,
        "transformer_layers_per_block": 1,
        "cross_attention_dim": _need(
            sd, "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight", name
        ).shape[1],
        "num_attention_heads": heads,
    }


def vae_config_from_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """``AutoencoderKLTemporalDecoder`` arguments from an SGM VAE state dict (prefix stripped)."""
    name = lambda k: VAE_PREFIX + k  # noqa: E731
    levels = _vae_levels(sd, r"^encoder\.down\.(\d+)\.")
    layers = len({m.group(1) for k in sd if (m := re.match(r"^encoder\.down\.0\.block\.(\d+)\.", k))})
    if levels == 0 or layers == 0:
        raise KeyError(name("encoder.down.0.block.0.conv1.weight"))
    channels = tuple(
        _need(sd, f"encoder.down.{i}.block.0.conv2.weight", name).shape[0] for i in range(levels)
    )
    latent = _need(sd, "decoder.conv_in.weight", name).shape[1]
    moments = _need(sd, "encoder.conv_out.weight", name).shape[0]
    if moments != 2 * latent:
        raise ModelFileError(
            f"the VAE encoder gives {moments} channels but the decoder takes {latent}; an SVD VAE's encoder "
            "gives mean and log-variance (twice the latent channels). The VAE part is not SVD's."
        )
    return {
        "in_channels": _need(sd, "encoder.conv_in.weight", name).shape[1],
        "out_channels": _need(sd, "decoder.conv_out.weight", name).shape[0],
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": latent,
        "sample_size": SVD_VAE_CONFIG["sample_size"],
    }


def clip_config_from_state_dict(
    sd: Mapping[str, Tensor], heads: int | None = None, hidden_act: str | None = None
) -> dict[str, Any]:
    """``CLIPVisionConfig`` arguments from a transformers-named CLIP vision state dict."""
    name = lambda k: CLIP_PREFIX + k  # noqa: E731
    patch = _need(sd, "vision_model.embeddings.patch_embedding.weight", name)
    hidden, channels, size = patch.shape[0], patch.shape[1], patch.shape[2]
    positions = _need(sd, "vision_model.embeddings.position_embedding.weight", name).shape[0]
    grid = round((positions - 1) ** 0.5)
    if grid * grid != positions - 1:
        raise ModelFileError(
            f"the image encoder has {positions} position embeddings, not a square grid plus the class "
            "token; it is not a ViT image encoder of the kind SVD uses."
        )
    layers = len({m.group(1) for k in sd if (m := _HF_BLOCK.match(k))})
    if heads is None:
        width = _OPEN_CLIP_HEAD_WIDTH.get(hidden, 64)
        if hidden % width:
            raise ModelFileError(
                f"image encoder width {hidden} is not a multiple of the assumed head width {width} "
                "(open_clip's); this is not SVD's ViT-H image encoder, or it needs its head count "
                "(record it in the file's i2vedit.clip_attention_heads metadata)."
            )
        heads = hidden // width
    if heads < 1 or hidden % heads:
        raise ModelFileError(f"image encoder width {hidden} cannot be split into {heads} attention heads.")
    return {
        "hidden_size": hidden,
        "intermediate_size": _need(sd, "vision_model.encoder.layers.0.mlp.fc1.weight", name).shape[0],
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_channels": channels,
        "image_size": grid * size,
        "patch_size": size,
        "projection_dim": _need(sd, "visual_projection.weight", name).shape[0],
        "hidden_act": hidden_act or "gelu",
        "layer_norm_eps": 1e-5,
    }


# --- building and loading ----------------------------------------------------------------------


def _load_strict(
    model: torch.nn.Module, sd: dict[str, Tensor], file_name: Callable[[str], str], what: str, p: Path
) -> None:
    """Every tensor of ``model`` from ``sd`` (taken, not copied), none left over, shapes equal."""
    expected = model.state_dict()
    missing = sorted(file_name(k) for k in set(expected) - set(sd))
    unexpected = sorted(file_name(k) for k in set(sd) - set(expected))
    wrong = sorted(
        f"{file_name(k)} {tuple(sd[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in set(expected) & set(sd)
        if tuple(sd[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_listed(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} not used: {_listed(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} with the wrong shape: {_listed(wrong)}")
    if problems:
        raise ModelFileError(
            f"{p}: the {what} does not match the model its shapes describe; keys "
            + "; ".join(problems)
            + ". The file is incomplete or not an SVD checkpoint. "
            + _HELP
        )
    model.load_state_dict(sd, strict=True, assign=True)


def _build_on_meta(
    make: Callable[[], torch.nn.Module], what: str, config: Mapping[str, Any]
) -> torch.nn.Module:
    """The model, without memory for its weights; a configuration the library refuses is named."""
    try:
        with torch.device("meta"):
            return make()
    except (ValueError, TypeError, RuntimeError, AssertionError) as e:
        raise ModelFileError(
            f"the {what} its tensor shapes describe ({dict(config)}) cannot be built ({e}); "
            "it is not an SVD model of the supported kind."
        ) from None


def _fill_meta_buffers(model: torch.nn.Module, what: str) -> None:
    """Non-persistent buffers are not in files; rebuild the known ones left on the meta device."""
    for mod_name, mod in model.named_modules():
        for name, buf in list(mod.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if name == "position_ids":
                mod.register_buffer(name, torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
            else:
                raise I2VEditError(f"internal: {what} buffer {mod_name}.{name} was not loaded.")


def _read(f: Any, keys: Iterable[str], prefix: str, dtype: torch.dtype, copy: bool) -> dict[str, Tensor]:
    """Tensors in ``dtype``, prefix stripped. ``copy``: into torch's own (aligned) memory, for models
    that stay on the CPU: CPU kernels can round differently on the reader's unaligned buffers."""
    return {k[len(prefix) :]: f.get_tensor(k).to(dtype, copy=copy) for k in keys}


def load_single_file(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    weights_dtype: torch.dtype = torch.float32,
) -> DiffusersSVDHost:
    """A ``DiffusersSVDHost`` from an SGM single-file SVD checkpoint (``svd.safetensors``, ``svd_xt``).

    Reads with safetensors only; the UNet is held in ``dtype``, the VAE and image encoder in
    float32 (as ``cli.load_diffusers_host`` does for a diffusers folder), all three stored in
    ``weights_dtype`` (``store_weights``: computing in fp32) before they move to ``device``, which
    defaults to CUDA when available. Models are built on the meta device and take the file's tensors, so the
    weights are in memory once. Raises ``ModelFileError`` / ``NotSVDModelError`` saying what is
    wrong for an unreadable, pickle, non-SVD, partial or mismatched file.
    """
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from .host import DiffusersSVDHost, store_weights

    p = Path(path)
    shapes, meta = _open_header(p)
    _check_layout(p, shapes)
    unet_heads = _int_meta(meta, _M_UNET_HEADS, p)
    clip_heads = _int_meta(meta, _M_CLIP_HEADS, p)
    clip_act = meta.get(_M_CLIP_ACT)
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cpu = dev.type == "cpu"

    def keys(prefix: str) -> list[str]:
        return [k for k in shapes if k.startswith(prefix)]

    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            # image encoder
            raw = _read(f, keys(CLIP_PREFIX), CLIP_PREFIX, torch.float32, on_cpu)
            hf_format = any(k.startswith(("vision_model.", "visual_projection.")) for k in raw)
            if hf_format:  # ComfyUI's checkpoint saver writes transformers names under the prefix
                raw.pop("vision_model.embeddings.position_ids", None)
                clip_sd = raw
            else:
                clip_sd = clip_open_clip_to_transformers(raw, CLIP_PREFIX)
            del raw
            cfg = clip_config_from_state_dict(clip_sd, clip_heads[0] if clip_heads else None, clip_act)
            clip = _build_on_meta(
                lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg)), "image encoder", cfg
            )
            _load_strict(clip, clip_sd, lambda k: _clip_file_name(k, hf_format), "image encoder", p)
            _fill_meta_buffers(clip, "image encoder")
            del clip_sd
            clip = store_weights(clip, weights_dtype).to(dev)

            # VAE
            vae_sgm = _read(f, keys(VAE_PREFIX), VAE_PREFIX, torch.float32, on_cpu)
            vae_cfg = vae_config_from_state_dict(vae_sgm)
            levels = len(vae_cfg["block_out_channels"])
            vae_sd = vae_sgm_to_diffusers(vae_sgm, VAE_PREFIX)
            del vae_sgm
            vae = _build_on_meta(lambda: AutoencoderKLTemporalDecoder(**vae_cfg), "VAE", vae_cfg)

            def vae_name(k: str) -> str:
                try:
                    return VAE_PREFIX + vae_diffusers_to_sgm_key(k, levels)
                except KeyError:
                    return k

            _load_strict(vae, vae_sd, vae_name, "VAE", p)
            _fill_meta_buffers(vae, "VAE")
            del vae_sd
            vae = store_weights(vae, weights_dtype).to(dev)

            # UNet
            unet_sgm = _read(f, keys(UNET_PREFIX), UNET_PREFIX, dtype, on_cpu)
            unet_sd = _convert_all(unet_sgm, comfy_to_diffusers_key, "UNet", UNET_PREFIX)
            del unet_sgm
            unet_cfg = unet_config_from_state_dict(unet_sd, unet_heads)
            unet = _build_on_meta(lambda: UNetSpatioTemporalConditionModel(**unet_cfg), "UNet", unet_cfg)

            def unet_name(k: str) -> str:
                try:
                    return UNET_PREFIX + diffusers_to_comfy_key(k)
                except KeyError:
                    return k

            _load_strict(unet, unet_sd, unet_name, "UNet", p)
            _fill_meta_buffers(unet, "UNet")
            del unet_sd
            unet = store_weights(unet, weights_dtype).to(dev)
    except KeyError as e:
        raise ModelFileError(
            f"{p} lacks the tensor {e.args[0]}, which an SVD checkpoint has; the file is incomplete. " + _HELP
        ) from None
    except ModelFileError as e:
        msg = str(e)
        raise ModelFileError(msg if msg.startswith(str(p)) else f"{p}: {msg}") from None
    except SafetensorError as e:
        raise ModelFileError(f"{p} could not be read ({e}); it may be truncated or damaged. " + _HELP) from e
    except (IndexError, TypeError, ValueError) as e:  # a tensor of a rank or kind no SVD checkpoint has
        if isinstance(e, I2VEditError):
            raise
        raise ModelFileError(
            f"{p} holds tensors of shapes no SVD checkpoint has ({type(e).__name__}: {e}); the file is damaged "
            "or was changed by another tool. " + _HELP
        ) from e
    return DiffusersSVDHost(unet, vae, clip, dtype=dtype, weights_dtype=weights_dtype)
