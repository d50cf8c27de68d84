"""``python -m i2vedit bench gpu`` at tiny size on the CPU: the code path of the full-size GPU run, end to end."""

from __future__ import annotations

import json

import pytest
import torch

from i2vedit.cli import main
from i2vedit.errors import I2VEditError
from i2vedit.tools.gpu import bench_gpu, build_full_host

STAGES = ("sarp", "encode", "invert", "lora", "condition", "denoise", "decode")


def test_bench_gpu_prints_every_stage_with_time_and_memory(capsys):
    argv = ["bench", "gpu", "--tiny", "--device", "cpu", "--chunk", "4", "--steps", "2", "--lora-steps", "2"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["video"] == {"frames": 7, "height": 64, "width": 128, "clips": 2}
    assert out["dtypes"] == {"weights": "fp32", "inversion": "fp32", "denoise": "fp32", "train": "fp32"}
    assert set(STAGES) <= set(out["stages"])
    for name in STAGES:
        stage = out["stages"][name]
        assert stage["seconds"] > 0 and stage["calls"] == 2, name
        assert stage["peak_bytes"] > 0, name
    assert out["peak_bytes"] == max(s["peak_bytes"] for s in out["stages"].values())
    assert out["seconds_run"] >= sum(s["seconds"] for s in out["stages"].values())
    assert out["weights_bytes"] > 0 and "memtrack" in out["memory_measure"]


def test_the_full_size_bench_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the full-size bench would run")
    with pytest.raises(I2VEditError, match="needs a CUDA GPU"):
        bench_gpu(device="cpu")


def test_the_full_size_models_are_svds_sizes():
    host = build_full_host(torch.device("meta"))  # shapes only: no memory, no compute
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(host.unet) == 1_524_623_082  # SVD's UNet, 1.52 B parameters
    assert list(host.vae.config.block_out_channels) == [128, 256, 512, 512] and count(host.vae) > 80_000_000
    assert (
        count(host.image_encoder) == 632_076_800
    )  # OpenCLIP ViT-H/14's vision tower and its 1024-d projection
    assert host.image_encoder.config.projection_dim == host.unet.config.cross_attention_dim == 1024
