"""The tiny random-weight SVD of the demo and the tests, in diffusers' classes (the ComfyUI tests build the
same weights in ComfyUI's classes, ``tests/fixtures/tiny_comfy.py``).

Same layout as the real SVD (4 levels, 2 res blocks, 16 transformer positions, temporal blocks,
768-d micro-conditioning), only narrower: 32 base channels, 16-d heads, 64-d CLIP context.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from ...svd import POSITIONS
from .host import DiffusersSVDHost

MODEL_CHANNELS = 32
CHANNEL_MULT = (1, 2, 4, 4)
HEAD_DIM = 16
CONTEXT_DIM = 64  # CLIP image-embedding width = UNet cross-attention width
CLIP_HIDDEN = 32
CLIP_LAYERS = 2
CLIP_HEADS = 2
CLIP_IMAGE_SIZE = 32
CLIP_PATCH = 8
VAE_CHANNELS = (32, 32, 32, 32)  # four levels keep the 8× downsampling of the real VAE


def block_channels() -> tuple[int, ...]:
    return tuple(MODEL_CHANNELS * m for m in CHANNEL_MULT)


def heads() -> tuple[int, ...]:
    return tuple(c // HEAD_DIM for c in block_channels())


def tiny_unet_config() -> dict[str, Any]:
    return {
        "sample_size": 8,
        "block_out_channels": block_channels(),
        "num_attention_heads": heads(),
        "cross_attention_dim": CONTEXT_DIM,
        "layers_per_block": 2,
        "num_frames": 25,
    }


def tiny_vae_config() -> dict[str, Any]:
    return {
        "block_out_channels": VAE_CHANNELS,
        "down_block_types": ("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        "layers_per_block": 1,
        "latent_channels": 4,
    }


def tiny_clip_config() -> dict[str, Any]:
    return {
        "hidden_size": CLIP_HIDDEN,
        "intermediate_size": 2 * CLIP_HIDDEN,
        "num_hidden_layers": CLIP_LAYERS,
        "num_attention_heads": CLIP_HEADS,
        "image_size": CLIP_IMAGE_SIZE,
        "patch_size": CLIP_PATCH,
        "projection_dim": CONTEXT_DIM,
    }


def sharpen_self_attention(host: DiffusersSVDHost, factor: float = 3.0) -> DiffusersSVDHost:
    """Scale the 32 self-attention layers' Q/K projections so a random-weight model's maps are peaked.

    Random initialisation gives nearly uniform attention, on which matching has nothing to do; the
    demo and benchmarks of random tiny models use this to make it work.
    """
    with torch.no_grad():
        for pos in POSITIONS:
            for name in (pos.diffusers_spatial, pos.diffusers_temporal):
                for proj in ("to_q", "to_k"):
                    host.unet.get_submodule(f"{name}.{proj}").weight.mul_(factor)
    return host


def build_tiny_diffusers_host(seed: int = 0, dtype: torch.dtype = torch.float32) -> DiffusersSVDHost:
    """A tiny random-weight SVD of the real diffusers architectures, the same for the same seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNetSpatioTemporalConditionModel(**tiny_unet_config())
        vae = AutoencoderKLTemporalDecoder(**tiny_vae_config())
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**tiny_clip_config()))
    if dtype != torch.float32:
        unet = unet.to(dtype)
    return DiffusersSVDHost(unet, vae, clip, dtype=dtype)


def write_tiny_svd_folder(folder: Path, seed: int = 0) -> Path:
    """The tiny random SVD as a diffusers folder (unet/, vae/, image_encoder/, as the Hub lays SVD out), for
    tools and tests that run the command line on it."""
    host = build_tiny_diffusers_host(seed=seed)
    host.unet.save_pretrained(folder / "unet", safe_serialization=True)
    host.vae.save_pretrained(folder / "vae", safe_serialization=True)
    host.image_encoder.save_pretrained(folder / "image_encoder", safe_serialization=True)
    return folder
