"""The headless-server harness (``tests/comfy_server.py``) against a real ComfyUI (``COMFYUI_PATH``).

The pack loads from ``custom_nodes/`` through ComfyUI's own loader; API-format prompts run stock
nodes on the test nodes' tiny SVD; validation errors, interrupts and output files come back over HTTP.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from comfy_server import ComfyServer, PromptRejected, status_messages

FRAMES, SIZE = 4, 64


def square_and_svd(steps: int, seed: int = 0) -> dict[str, Any]:
    """TinySVD + MovingSquare → SARPPerturb → SaveImage, and stock SVD conditioning → KSampler → SaveImage."""
    return {
        "1": {"class_type": "I2VEditTest_TinySVD", "inputs": {"seed": 0, "sharpen": 3.0}},
        "2": {
            "class_type": "I2VEditTest_MovingSquare",
            "inputs": {"frames": FRAMES, "width": SIZE, "height": SIZE, "fps": 8.0},
        },
        "3": {
            "class_type": "SARPPerturb",
            "inputs": {"frames": ["2", 0], "noise_scale": 0.005, "threshold": 0.001, "seed": 0},
        },
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "harness/sarp"}},
        "5": {
            "class_type": "SVD_img2vid_Conditioning",
            "inputs": {
                "clip_vision": ["1", 1],
                "init_image": ["2", 2],
                "vae": ["1", 2],
                "width": SIZE,
                "height": SIZE,
                "video_frames": FRAMES,
                "motion_bucket_id": 127,
                "fps": 8,
                "augmentation_level": 0.0,
            },
        },
        "6": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "seed": seed,
                "steps": steps,
                "cfg": 2.5,
                "sampler_name": "euler",
                "scheduler": "karras",
                "positive": ["5", 0],
                "negative": ["5", 1],
                "latent_image": ["5", 2],
                "denoise": 1.0,
            },
        },
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "harness/svd"}},
    }


def test_server_lists_pack_and_test_nodes(comfy_server: ComfyServer) -> None:
    info = comfy_server.object_info()
    assert info["SARPPerturb"]["python_module"] == "custom_nodes.i2vedit"
    for node in ("I2VEditTest_TinySVD", "I2VEditTest_MovingSquare"):
        assert info[node]["python_module"] == "custom_nodes.i2vedit_test_nodes"
    assert info["I2VEditTest_TinySVD"]["output"] == ["MODEL", "CLIP_VISION", "VAE"]
    assert comfy_server.object_info("SARPPerturb")["category"] == "I2VEdit/inversion"
    assert (comfy_server.models_dir / "loras").is_dir()
    assert not re.search(r"\(IMPORT FAILED\): .*custom_nodes", comfy_server.log())
    from test_workflows import pack_node_ids

    ours = pack_node_ids()  # every node_id declared in nodes/*.py
    assert len(ours) == 18
    assert {k for k, v in info.items() if v["python_module"] == "custom_nodes.i2vedit"} == ours
    assert all(info[k]["category"].split("/")[0] == "I2VEdit" for k in ours)


def test_prompt_runs_pack_and_stock_nodes_and_saves_files(comfy_server: ComfyServer) -> None:
    from PIL import Image

    entry = comfy_server.run(square_and_svd(steps=2), timeout=120)
    assert "execution_success" in status_messages(entry)
    files = comfy_server.output_files(entry)
    assert len(files) == 2 * FRAMES
    for path in files:
        assert path.is_file() and path.parent == comfy_server.output_dir / "harness"
        with Image.open(path) as im:
            assert im.size == (SIZE, SIZE)
    assert sorted(entry["outputs"]) == ["4", "8"]


def test_invalid_prompt_is_rejected_with_node_errors(comfy_server: ComfyServer) -> None:
    prompt = {
        "1": {
            "class_type": "I2VEditTest_MovingSquare",
            "inputs": {"frames": 2, "width": 64, "height": 64, "fps": 8.0},
        },
        "2": {
            "class_type": "SARPPerturb",
            "inputs": {"frames": ["1", 0], "noise_scale": 5.0, "threshold": 0.001, "seed": 0},  # max is 0.1
        },
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }
    with pytest.raises(PromptRejected) as info:
        comfy_server.queue(prompt)
    assert info.value.error["type"] == "prompt_outputs_failed_validation"
    errors = info.value.node_errors["2"]["errors"]
    assert [e["type"] for e in errors] == ["value_bigger_than_max"]
    assert errors[0]["extra_info"]["input_name"] == "noise_scale"
    assert comfy_server.get("/system_stats")["system"]["comfyui_version"]


def test_interrupt_stops_a_long_sampler_and_server_keeps_working(comfy_server: ComfyServer) -> None:
    steps = 10_000
    log_start = len(comfy_server.log())
    prompt_id = comfy_server.queue(square_and_svd(steps=steps, seed=1))
    progress = re.compile(rf"\b[1-9]\d*/{steps} \[")
    deadline = time.monotonic() + 60
    while not progress.search(comfy_server.log()[log_start:]):  # KSampler's progress bar: sampling has begun
        assert time.monotonic() < deadline, comfy_server.log_tail()
        assert comfy_server.history(prompt_id) is None, "the long prompt finished before it was interrupted"
        time.sleep(0.1)
    assert comfy_server.running_prompt_ids() == [prompt_id]

    t0 = time.monotonic()
    comfy_server.interrupt(prompt_id)
    entry = comfy_server.wait(prompt_id, timeout=10)
    latency = time.monotonic() - t0
    assert latency < 5.0
    assert entry["status"]["status_str"] == "error"
    msgs = status_messages(entry)
    assert msgs["execution_interrupted"]["node_type"] == "KSampler"
    assert "execution_error" not in msgs

    assert comfy_server.running_prompt_ids() == []
    small = {k: v for k, v in square_and_svd(steps=1).items() if k in ("2", "3")}
    small["3"]["inputs"]["seed"] = 7  # not cached: SARPPerturb really runs again
    small["9"] = {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}
    after = comfy_server.run(small, timeout=60)
    assert [img["type"] for img in after["outputs"]["9"]["images"]] == ["temp"] * FRAMES
