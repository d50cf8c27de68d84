"""Test-only ComfyUI V3 nodes (ids ``I2VEditTest_*``), loaded next to the pack by ``tests/comfy_server.py``.

They give server tests the inputs a real user would load from disk: a tiny random-weight SVD
(MODEL, CLIP_VISION, VAE) and a small synthetic video with its edited first frame.

How they reach the pack's core (``i2vedit/``): ComfyUI's loader registers the pack in
``sys.modules`` under the path of its folder in ``custom_nodes/`` (dots replaced), so the core is
``<that name>.i2vedit``. These nodes look the pack module up there at execute time (custom nodes
load in directory-listing order, so the pack may load after this package) and import the core as
its submodule. They deliberately do *not* put the project root on ``sys.path``: that would load a
second copy of the core as top-level ``i2vedit`` with its own classes (objects passed between test
nodes and pack nodes would fail ``isinstance`` checks) and would hide a pack that wrongly imports
``i2vedit`` absolutely, which breaks in a real ``custom_nodes/`` install.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

from comfy_api.latest import ComfyExtension, io

CATEGORY = "I2VEditTest"
# This package is symlinked from <project>/tests/comfy_test_nodes, so the project root is two levels up.
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))


def pack_module() -> ModuleType:
    """The I2VEdit pack as ComfyUI loaded it (the module whose file is the project's ``__init__.py``)."""
    target = os.path.join(PROJECT_ROOT, "__init__.py")
    for name, mod in list(sys.modules.items()):
        path = getattr(mod, "__file__", None)
        if path and hasattr(mod, "comfy_entrypoint") and os.path.realpath(path) == target:
            return sys.modules[name]
    raise RuntimeError(
        f"the I2VEdit pack ({PROJECT_ROOT}) is not loaded in this ComfyUI; link it into custom_nodes/."
    )


def core(submodule: str) -> Any:
    """``i2vedit.<submodule>`` of the loaded pack, e.g. ``core("hosts.comfy.host")``."""
    return importlib.import_module(f"{pack_module().__name__}.i2vedit.{submodule}")


def tiny_comfy() -> ModuleType:
    """``tests/fixtures/tiny_comfy.py``, loaded by path and pointed at the core of the loaded pack."""
    name = "i2vedit_test_tiny_comfy"
    if name not in sys.modules:
        path = os.path.join(PROJECT_ROOT, "tests", "fixtures", "tiny_comfy.py")
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    module = sys.modules[name]
    module.CORE = f"{pack_module().__name__}.i2vedit"
    return module


class TinySVD(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="I2VEditTest_TinySVD",
            display_name="Tiny random SVD (I2VEdit test)",
            category=CATEGORY,
            description="Test only: the tiny random-weight SVD of the project's tests, self-attention sharpened.",
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
                io.Float.Input("sharpen", default=3.0, min=0.0, max=100.0, step=0.1),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL"),
                io.ClipVision.Output(display_name="CLIP_VISION"),
                io.Vae.Output(display_name="VAE"),
            ],
        )

    @classmethod
    def execute(cls, seed: int, sharpen: float) -> io.NodeOutput:
        host = tiny_comfy().build_tiny_comfy_host(seed=seed, with_vae=True)
        if sharpen != 1.0:
            tiny_comfy().sharpen_comfy_self_attention(host.patcher, sharpen)
        return io.NodeOutput(host.patcher, host.clip_vision, host.vae)


class MovingSquare(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="I2VEditTest_MovingSquare",
            display_name="Moving square video (I2VEdit test)",
            category=CATEGORY,
            description="Test only: a textured square moving over a flat background, and its first frame "
            "with the square recoloured (the CLI demo's video).",
            inputs=[
                io.Int.Input("frames", default=6, min=1, max=256),
                io.Int.Input("width", default=64, min=32, max=1024, step=8),
                io.Int.Input("height", default=64, min=32, max=1024, step=8),
                io.Float.Input("fps", default=8.0, min=0.1, max=120.0, step=0.1),
            ],
            outputs=[
                io.Image.Output(display_name="frames"),
                io.Float.Output(display_name="fps"),
                io.Image.Output(display_name="edited_first_frame"),
            ],
        )

    @classmethod
    def execute(cls, frames: int, width: int, height: int, fps: float) -> io.NodeOutput:
        video, edited = core("cli").demo_video(frames, (height, width))
        return io.NodeOutput(video.float().contiguous(), float(fps), edited.float().contiguous())


class I2VEditTestExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [TinySVD, MovingSquare]


async def comfy_entrypoint() -> ComfyExtension:
    return I2VEditTestExtension()
