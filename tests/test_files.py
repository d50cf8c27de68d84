"""The one atomic writer: whole file or the previous one, the user's permissions, no temp files left."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from i2vedit.errors import I2VEditError, LoRAFileError
from i2vedit.io.files import atomic_write, save_safetensors_atomic, write_text_atomic
from i2vedit.io.video import probe_video, write_video
from i2vedit.lora.file import LoRAPair, LoRAWeights, save_lora

posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX file modes and umask")


def _lora() -> LoRAWeights:
    g = torch.Generator().manual_seed(0)
    name = "input_blocks.1.1.time_stack.0.attn1.to_q"
    down, up = torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g)
    return LoRAWeights({name: LoRAPair(down, up, 4.0)}, steps=1)


WRITERS = {
    "atomic_write": lambda p: atomic_write(p / "a.bin", lambda tmp: tmp.write_bytes(b"abc")),
    "write_text_atomic": lambda p: write_text_atomic(p / "report.json", "{}"),
    "save_safetensors_atomic": lambda p: save_safetensors_atomic(p / "t.safetensors", {"x": torch.ones(3)}),
    "save_lora": lambda p: save_lora(p / "m.safetensors", _lora()),
    "write_video": lambda p: write_video(p / "edited.mp4", torch.rand(2, 64, 64, 3), 8.0) or p / "edited.mp4",
}


@pytest.fixture
def umask():
    """Set a umask for the test and restore the previous one."""
    old = os.umask(0o022)
    try:
        yield lambda mask: os.umask(mask)
    finally:
        os.umask(old)


@posix_only
@pytest.mark.parametrize("mask", [0o022, 0o027])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_written_files_get_the_users_normal_permissions(tmp_path, umask, mask, writer):
    umask(mask)
    path = Path(WRITERS[writer](tmp_path))
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0o600
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def test_a_failure_mid_write_keeps_the_previous_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "report.json"
    write_text_atomic(path, json.dumps({"run": 1}))
    before = path.read_bytes()

    def half_then_full_disk(tmp: Path) -> None:
        tmp.write_bytes(b'{"run": ')
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(I2VEditError) as e:
        atomic_write(path, half_then_full_disk, "report")
    message = str(e.value)
    assert f"could not write report {path}" in message
    assert "No space left on device" in message and "free disk space" in message
    assert "previous file there is unchanged" in message
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_ctrl_c_mid_write_stays_an_interrupt_and_keeps_the_previous_file(tmp_path):
    path = tmp_path / "t.safetensors"
    save_safetensors_atomic(path, {"x": torch.zeros(4)})
    before = path.read_bytes()

    def interrupted(tmp: Path) -> None:
        tmp.write_bytes(b"\0" * 10)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]


def test_a_clear_error_from_the_writer_is_kept_and_the_error_class_chosen(tmp_path):
    def refuse(tmp: Path) -> None:
        raise I2VEditError("the writer's own message")

    with pytest.raises(I2VEditError, match=r"^the writer's own message$"):
        atomic_write(tmp_path / "x.bin", refuse)

    def fail(tmp: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(LoRAFileError, match=r"could not write LoRA .*Input/output error"):
        atomic_write(tmp_path / "m.safetensors", fail, "LoRA", error=LoRAFileError)
    assert list(tmp_path.iterdir()) == []


def test_temp_files_sit_next_to_the_target_and_keep_a_format_suffix(tmp_path):
    seen = []

    def record(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_bytes(b"x")

    atomic_write(tmp_path / "edited.mp4", record)
    atomic_write(tmp_path / "m.safetensors", record)
    mp4, st = seen
    assert mp4.parent == st.parent == tmp_path
    assert mp4.name.startswith(".edited.") and mp4.name.endswith(".tmp.mp4")  # OpenCV picks mp4 by suffix
    assert st.name.startswith(".m.safetensors.") and st.name.endswith(".tmp")  # no loader lists it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited.mp4", "m.safetensors"]


def test_success_replaces_the_content_whole(tmp_path):
    path = tmp_path / "t.safetensors"
    save_safetensors_atomic(path, {"x": torch.zeros(4)}, {"k": "1"})
    save_safetensors_atomic(path, {"y": torch.arange(3.0)})
    assert list(load_file(str(path))) == ["y"]
    write_video(tmp_path / "v.mp4", torch.rand(3, 64, 64, 3), 8.0)
    assert probe_video(tmp_path / "v.mp4").num_frames == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors", "v.mp4"]


def test_a_name_near_the_length_limit_still_gets_a_temp_file(tmp_path):
    path = tmp_path / ("n" * 240 + ".mp4")  # the temp name is cut, not the target's
    write_video(path, torch.rand(2, 64, 64, 3), 8.0)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_missing_folder_folder_target_and_unwritable_folder_are_named(tmp_path):
    with pytest.raises(I2VEditError, match="does not exist; create it first"):
        atomic_write(tmp_path / "no" / "x.bin", lambda tmp: None)
    (tmp_path / "d.bin").mkdir()
    with pytest.raises(I2VEditError, match="is a folder; give a file path"):
        atomic_write(tmp_path / "d.bin", lambda tmp: None)
    with pytest.raises(I2VEditError, match="choose a shorter name"):
        atomic_write(tmp_path / ("x" * 300) / "y.bin", lambda tmp: None)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc refuses new files on Linux only")
def test_a_folder_that_refuses_new_files_is_named(tmp_path):
    # /proc refuses file creation even to root, where chmod-ed folders would not.
    with pytest.raises(
        I2VEditError, match=r"cannot write to folder /proc .*choose a folder you can write to"
    ):
        write_text_atomic("/proc/i2vedit-report.json", "{}")
