"""Sizes of the tiny random-weight SVD used by tests and the demo (both hosts build the same one).

Same layout as the real SVD (4 levels, 2 res blocks, 16 transformer positions, temporal blocks,
768-d micro-conditioning), only narrower: 32 base channels, 16-d heads, 64-d CLIP context.
"""

from __future__ import annotations

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

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def block_channels() -> tuple[int, ...]:
    return tuple(MODEL_CHANNELS * m for m in CHANNEL_MULT)


def heads() -> tuple[int, ...]:
    return tuple(c // HEAD_DIM for c in block_channels())
