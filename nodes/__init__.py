"""ComfyUI V3 nodes: thin wrappers that validate inputs, call ``i2vedit`` and wrap outputs."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .sarp_node import SARPPerturb

NODES: list[type[io.ComfyNode]] = [SARPPerturb]


class I2VEditExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
