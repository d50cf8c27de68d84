"""Nodes inside a real ComfyUI (COMFYUI_PATH): the pack loads through ComfyUI's own loader and runs.

The check runs in a fresh interpreter whose ``sys.path`` holds ComfyUI but not this repository, as
when the pack sits in ``custom_nodes/``.
"""

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT

pytestmark = pytest.mark.usefixtures("comfy")

SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, torch
    from comfy.cli_args import args
    args.cpu = not torch.cuda.is_available()
    import nodes
    assert asyncio.run(nodes.load_custom_node(sys.argv[1], module_parent="custom_nodes")) is True
    node = nodes.NODE_CLASS_MAPPINGS["SARPPerturb"]
    frames = torch.rand(2, 16, 16, 3, generator=torch.Generator().manual_seed(0))
    frames[:, 4:12, 4:12] = 0.25
    out = node.execute(frames=frames, noise_scale=0.005, threshold=0.001, seed=3).result
    core = sys.modules[node.__module__.rsplit(".", 2)[0] + ".i2vedit.method.sarp"]
    ref, mask = core.sarp(frames, seed=3)
    assert torch.equal(out[0], ref) and torch.equal(out[1], mask.float()) and mask.any()
    print("LOADED", sorted(k for k in nodes.NODE_CLASS_MAPPINGS if k == "SARPPerturb"))
    """
)


def test_pack_loads_through_comfy_loader_and_sarp_node_matches_core(tmp_path):
    comfy_path = os.environ["COMFYUI_PATH"]
    env = dict(os.environ, PYTHONPATH=comfy_path)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(ROOT)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "LOADED ['SARPPerturb']" in proc.stdout
