"""ComfyUI V3 nodes: thin wrappers that validate inputs, call ``i2vedit`` and wrap outputs."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .common import register_folders

register_folders()  # before any schema lists the LoRA and inversion folders

from .edit_nodes import AttentionMatchSampler, EditVideo, SkipIntervalKVCache  # noqa: E402
from .inversion_nodes import EDMInvertSVD, InversionCheck, LoadInversion, SaveInversion  # noqa: E402
from .lora_nodes import LoadMotionLoRA, SaveMotionLoRA, TrainMotionLoRA  # noqa: E402
from .sarp_node import SARPPerturb  # noqa: E402
from .video_nodes import (  # noqa: E402
    AutoRegionMask,
    FitFrames,
    MaskPreview,
    RestoreFrames,
    SampleFrames,
    SelectClip,
    StitchClips,
)

NODES: list[type[io.ComfyNode]] = [
    EditVideo,
    SampleFrames,
    FitFrames,
    SelectClip,
    SARPPerturb,
    EDMInvertSVD,
    InversionCheck,
    SaveInversion,
    LoadInversion,
    TrainMotionLoRA,
    SaveMotionLoRA,
    LoadMotionLoRA,
    SkipIntervalKVCache,
    AttentionMatchSampler,
    StitchClips,
    RestoreFrames,
    MaskPreview,
    AutoRegionMask,
]


class I2VEditExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
