"""Shared fixtures. ComfyUI tests find a real ComfyUI through ``COMFYUI_PATH`` and skip without one."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

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
    from i2vedit.hosts.diffusers_host import build_tiny_diffusers_host

    return build_tiny_diffusers_host(seed=0)
