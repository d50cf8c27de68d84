"""Every random draw of a run comes from a seed derived from (run seed, clip, purpose, index).

So a stage run on its own (a node) and the same stage inside ``run.pipeline.edit_video`` draw the
same numbers for the same seed, a resumed run draws what an uninterrupted one would, and no two
purposes share a stream. ``index`` tells apart draws of one purpose: the edit (conditioning noise
of each edited frame) or the training step.
"""

from __future__ import annotations

import hashlib
from enum import IntEnum

import torch


class Purpose(IntEnum):
    SARP = 0  # smooth-area perturbation noise
    ENCODE = 1  # VAE posterior samples and conditioning noise of the inversion
    CONDITION = 2  # conditioning noise of matched denoising (index: the edit)
    TRAIN_RES = 3  # the first clip re-encoded at training resolution (skip-interval K/V of training)
    TRAIN_ENCODE = 4  # a clip encoded at training resolution
    TRAIN = 5  # a clip's LoRA training seed (initial LoRA, then the steps')
    TRAIN_STEP = 6  # one training step's σ, noise and conditioning noise (index: the step)
    TRAIN_DROPOUT = 7  # one training step's LoRA dropout (torch's global generator; index: the step)


def derived_seed(seed: int, clip: int, purpose: Purpose, index: int | None = None) -> int:
    """A 63-bit seed for one purpose of one clip, independent of every other purpose's draws."""
    parts = (int(seed), int(clip), int(purpose)) + (() if index is None else (int(index),))
    h = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def generator(seed: int, clip: int, purpose: Purpose, index: int | None = None) -> torch.Generator:
    """A CPU generator seeded with ``derived_seed``."""
    return torch.Generator().manual_seed(derived_seed(seed, clip, purpose, index))


def train_seed(seed: int, clip: int) -> int:
    """The LoRA training seed of a clip (31 bits: ComfyUI widgets and torch.manual_seed take it as a plain int)."""
    return derived_seed(seed, clip, Purpose.TRAIN) % 2**31
