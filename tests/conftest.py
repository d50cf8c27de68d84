"""Shared fixtures. ComfyUI tests find a real ComfyUI through ``COMFYUI_PATH`` and skip without one."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from comfy_server import comfy_server  # noqa: E402, F401  (session fixture: a headless ComfyUI server)

COMFY_SKIP = (
    "needs a real ComfyUI: set COMFYUI_PATH to a ComfyUI checkout whose requirements are installed "
    "in this Python (see README, 'Testing against ComfyUI')"
)


def _import_comfy() -> None:
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip(COMFY_SKIP)
    if not (Path(path) / "comfy" / "model_patcher.py").is_file():
        pytest.fail(f"COMFYUI_PATH={path} does not look like a ComfyUI checkout (no comfy/model_patcher.py).")
    if path not in sys.path:
        sys.path.insert(0, path)
    import torch
    from comfy.cli_args import args

    if not torch.cuda.is_available():
        args.cpu = True  # must be set before comfy.model_management is first imported
    import comfy.model_management  # noqa: F401  (fails loudly if the checkout cannot import)


@pytest.fixture(scope="session")
def comfy() -> None:
    """Make a real ComfyUI importable, or skip the test saying how to run it."""
    _import_comfy()


@pytest.fixture(scope="session")
def tiny_diffusers_host():
    from i2vedit.hosts.diffusers.tiny import build_tiny_diffusers_host

    return build_tiny_diffusers_host(seed=0)


def sharpen_self_attention(host, factor: float = 3.0):
    """Peaked attention for random-weight tests (architecture.md, "Testing"), on either host.

    The diffusers host has its own (``hosts.diffusers.tiny.sharpen_self_attention``), the ComfyUI
    host one in ``fixtures.tiny_comfy``.
    """
    if hasattr(host, "unet"):
        from i2vedit.hosts.diffusers.tiny import sharpen_self_attention as sharpen_diffusers

        return sharpen_diffusers(host, factor)
    from fixtures.tiny_comfy import sharpen_comfy_self_attention

    sharpen_comfy_self_attention(host.patcher, factor)
    return host


def unet_count() -> int:
    """diffusers UNets alive now (after a collection): a copy of the model shows."""
    import gc

    from diffusers import UNetSpatioTemporalConditionModel

    gc.collect()
    return sum(isinstance(o, UNetSpatioTemporalConditionModel) for o in gc.get_objects())


def align_groupnorm_eps(diffusers_host):
    """diffusers builds SVD's resnet GroupNorms with eps 1e-6, ComfyUI (like Stability's sgm) with 1e-5."""
    import copy

    import torch

    aligned = copy.copy(diffusers_host)
    aligned.unet = copy.deepcopy(diffusers_host.unet)
    changed = 0
    for name, mod in aligned.unet.named_modules():
        if isinstance(mod, torch.nn.GroupNorm) and "_res_block" in name and mod.eps != 1e-5:
            mod.eps, changed = 1e-5, changed + 1
    assert changed == 72
    return aligned


@pytest.fixture(scope="session")
def pack(comfy):
    """The node pack imported in this process as ComfyUI would, under its own package name.

    ComfyUI's loader imports the pack's folder as a package; doing the same here (name
    ``i2vedit_pack``) gives the real node classes, with ``folder_paths`` pointing at a temporary
    base directory so nothing is written into the ComfyUI checkout.
    """
    import importlib.util
    import tempfile

    import folder_paths

    base = tempfile.mkdtemp(prefix="i2vedit-comfy-base-")
    folder_paths.set_output_directory(os.path.join(base, "output"))
    folder_paths.set_temp_directory(os.path.join(base, "temp"))
    folder_paths.folder_names_and_paths["loras"] = ([os.path.join(base, "models", "loras")], {".safetensors"})
    folder_paths.models_dir = os.path.join(base, "models")
    spec = importlib.util.spec_from_file_location(
        "i2vedit_pack", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["i2vedit_pack"] = module
    spec.loader.exec_module(module)
    import importlib

    return importlib.import_module("i2vedit_pack.nodes")
