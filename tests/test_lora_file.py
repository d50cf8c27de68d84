"""Motion LoRA files: format, round trip, atomic writes, path rules, and refusing bad or foreign files."""

import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ROOT
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from i2vedit.errors import I2VEditError, LoRAError, LoRAFileError
from i2vedit.lora import file as lora_file
from i2vedit.lora.file import (
    FORMAT_TAG,
    LoRAPair,
    LoRAWeights,
    check_lora_fits,
    check_lora_name,
    infer_target_set,
    load_lora,
    save_lora,
    validate_rank,
)
from i2vedit.lora.targets import BLOCK_LINEARS, to_comfy_name
from i2vedit.svd import POSITIONS

CONTEXT = 16


def svd_shapes(target_set="temporal", base=8):
    """``{comfy name: (out, in)}`` with SVD's layout and per-layer shape rules at a small width."""
    out = {}
    for pos in POSITIONS:
        c = base * min(pos.downscale, 4)
        rules = {
            "ff_in.net.0.proj": (8 * c, c),
            "ff_in.net.2": (c, 4 * c),
            "ff.net.0.proj": (8 * c, c),
            "ff.net.2": (c, 4 * c),
            "attn2.to_k": (c, CONTEXT),
            "attn2.to_v": (c, CONTEXT),
        }
        for lin in BLOCK_LINEARS[target_set]:
            out[f"{pos.comfy_prefix}.time_stack.0.{lin}"] = rules.get(lin, (c, c))
    return out


def make_weights(shapes=None, rank=4, alpha=None, gen=0, dtype=torch.float32, **fields):
    shapes = svd_shapes() if shapes is None else shapes
    g = torch.Generator().manual_seed(gen)
    modules = {
        name: LoRAPair(
            torch.randn(rank, i, generator=g).to(dtype),
            torch.randn(o, rank, generator=g).to(dtype),
            float(rank if alpha is None else alpha),
        )
        for name, (o, i) in shapes.items()
    }
    return LoRAWeights(modules, **fields)


def clone_weights(w):
    return {n: (p.down.clone(), p.up.clone(), p.alpha) for n, p in w.modules.items()}


def same_weights(w, snapshot):
    return set(w.modules) == set(snapshot) and all(
        torch.equal(p.down, snapshot[n][0])
        and torch.equal(p.up, snapshot[n][1])
        and p.alpha == snapshot[n][2]
        for n, p in w.modules.items()
    )


FIELDS = dict(
    target_set="temporal",
    steps=250,
    clip_index=2,
    frames=14,
    resolution=(512, 896),
    seed=23,
    model_fingerprint="svd-0123456789ab",
)


def test_lora_modules_import_without_any_model_library(tmp_path):
    script = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, sys.argv[1])
        import i2vedit.lora.targets, i2vedit.lora.file
        print("HEAVY", [m for m in ("comfy", "diffusers", "transformers", "peft") if m in sys.modules])
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(ROOT)], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "HEAVY []" in out.stdout


# ------------------------------------------------------------------------------ format, round trip


def test_round_trip_is_bit_identical_with_all_metadata(tmp_path):
    w = make_weights(**FIELDS, extra_metadata={"note": "clip 2 of dance.mp4"})
    path = save_lora(tmp_path / "clip2.safetensors", w)
    assert path == (tmp_path / "clip2.safetensors").resolve()
    back = load_lora(path)
    assert same_weights(back, clone_weights(w))
    assert all(back.modules[n].down.dtype == torch.float32 for n in w.modules)
    for key, value in FIELDS.items():
        assert getattr(back, key) == value
    assert back.extra_metadata == {"note": "clip 2 of dance.mp4"}
    assert back.rank == 4 and back.alpha == 4.0
    assert back.metadata() == w.metadata()


def test_file_uses_comfyui_lora_keys_and_string_metadata(tmp_path):
    w = make_weights(rank=4, alpha=4, **FIELDS)
    path = save_lora(tmp_path / "m.safetensors", w)
    sd = load_file(path)
    assert len(sd) == 3 * 192
    base = "diffusion_model.input_blocks.1.1.time_stack.0.attn2.to_k"
    assert sd[base + ".lora_up.weight"].shape == (8, 4)  # (out, rank)
    assert sd[base + ".lora_down.weight"].shape == (4, CONTEXT)  # (rank, in)
    assert sd[base + ".alpha"].shape == () and sd[base + ".alpha"].item() == 4.0
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert all(isinstance(v, str) for v in meta.values())
    assert meta == {
        "i2vedit.format": FORMAT_TAG,
        "i2vedit.format_version": "1",
        "i2vedit.rank": "4",
        "i2vedit.alpha": "4.0",
        "i2vedit.targets": "temporal",
        "i2vedit.steps": "250",
        "i2vedit.clip_index": "2",
        "i2vedit.frames": "14",
        "i2vedit.resolution": "512x896",
        "i2vedit.seed": "23",
        "i2vedit.model_fingerprint": "svd-0123456789ab",
    }


def test_optional_metadata_is_left_out_and_target_set_inferred(tmp_path):
    w = make_weights(svd_shapes("temporal_attention"), rank=2)
    back = load_lora(save_lora(tmp_path / "a.safetensors", w))
    assert back.target_set == "temporal_attention"
    assert (back.steps, back.clip_index, back.frames, back.resolution, back.seed) == (None,) * 5
    assert back.model_fingerprint is None


def test_bf16_and_inexact_alpha_round_trip_exactly(tmp_path):
    w = make_weights(rank=3, alpha=0.1, dtype=torch.bfloat16)
    back = load_lora(save_lora(tmp_path / "b.safetensors", w))
    assert same_weights(back, clone_weights(w))  # alpha 0.1 exactly, not its float32 rounding
    assert next(iter(back.modules.values())).up.dtype == torch.bfloat16


def test_num_params_and_shapes():
    shapes = svd_shapes()
    w = make_weights(shapes, rank=4)
    assert w.shapes() == shapes
    assert w.num_params() == sum(4 * (o + i) for o, i in shapes.values())
    assert infer_target_set(shapes) == "temporal"
    assert infer_target_set(svd_shapes("temporal_attention")) == "temporal_attention"
    assert infer_target_set(["input_blocks.1.1.transformer_blocks.0.attn1.to_q"]) is None


# ------------------------------------------------------------------------------------ atomic save


def test_failed_replace_leaves_the_previous_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_lora(path, make_weights(gen=1))
    before = path.read_bytes()
    w = make_weights(gen=2)
    snapshot = clone_weights(w)

    def boom(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(lora_file.os, "replace", boom)
    with pytest.raises(
        LoRAFileError, match=r"could not write LoRA.*Permission denied.*previous file.*unchanged"
    ):
        save_lora(path, w)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    assert same_weights(w, snapshot)


def test_disk_full_mid_write_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_lora(path, make_weights(gen=1))
    before = path.read_bytes()

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lora_file, "save_file", half_write)
    with pytest.raises(LoRAFileError, match=r"No space left on device.*free disk space"):
        save_lora(path, make_weights(gen=2))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


@pytest.mark.parametrize(
    ("break_it", "match"),
    [
        (lambda m, n: m.__setitem__(n, m[n]._replace(up=torch.zeros(3, 5))), "has rank 5 but down"),
        (lambda m, n: m[n].down.__setitem__((0, 0), float("nan")), "NaN or infinite"),
        (lambda m, n: m.__setitem__(n, m[n]._replace(alpha=-1.0)), "alpha -1.0 is not a positive"),
        (lambda m, n: m.__setitem__(n, m[n]._replace(down=m[n].down[None])), "must both be 2-D"),
        (
            lambda m, n: m.__setitem__("input_blocks.1.1.transformer_blocks.0.attn1.to_q", m[n]),
            "not in target set 'temporal'.*transformer_blocks.0.attn1.to_q",
        ),
    ],
)
def test_invalid_weights_are_refused_before_touching_the_file(tmp_path, break_it, match):
    path = tmp_path / "m.safetensors"
    save_lora(path, make_weights(gen=1))
    before = path.read_bytes()
    w = make_weights(gen=2, target_set="temporal")
    break_it(w.modules, "input_blocks.1.1.time_stack.0.ff.net.2")
    with pytest.raises(LoRAError, match=match):
        save_lora(path, w)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_save_refuses_mixed_ranks_empty_loras_and_reserved_metadata(tmp_path):
    w = make_weights(rank=4)
    name = next(iter(w.modules))
    w.modules[name] = LoRAPair(torch.zeros(2, w.modules[name].down.shape[1]), torch.zeros(8, 2), 4.0)
    with pytest.raises(LoRAError, match=r"mixes ranks \[2, 4\]"):
        save_lora(tmp_path / "m.safetensors", w)
    with pytest.raises(LoRAError, match="no layers"):
        save_lora(tmp_path / "m.safetensors", LoRAWeights({}))
    with pytest.raises(LoRAError, match="reserved prefix"):
        save_lora(tmp_path / "m.safetensors", make_weights(extra_metadata={"i2vedit.rank": "7"}))
    with pytest.raises(I2VEditError, match="unknown LoRA target set 'everything'"):
        save_lora(tmp_path / "m.safetensors", make_weights(target_set="everything"))
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_wrong_suffix_missing_folder_and_folders(tmp_path):
    w = make_weights()
    with pytest.raises(LoRAFileError, match=r"does not end in \.safetensors"):
        save_lora(tmp_path / "m.pt", w)
    with pytest.raises(LoRAFileError, match="does not exist; create it first"):
        save_lora(tmp_path / "nope" / "m.safetensors", w)
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(LoRAFileError, match="is a folder"):
        save_lora(tmp_path / "d.safetensors", w)


# ------------------------------------------------------------------------------------ path rules


def test_allowed_dirs_refuse_paths_outside_them(tmp_path):
    loras, other = tmp_path / "loras", tmp_path / "other"
    loras.mkdir()
    other.mkdir()
    w = make_weights()
    assert save_lora(loras / "ok.safetensors", w, allowed_dirs=[loras]).parent == loras.resolve()
    for bad in (other / "x.safetensors", loras / ".." / "other" / "x.safetensors"):
        with pytest.raises(LoRAFileError, match=rf"outside the allowed folders \({loras.resolve()}\)"):
            save_lora(bad, w, allowed_dirs=[loras])
    # A symlink inside the allowed folder that points outside it is followed, and refused.
    (loras / "escape").symlink_to(other, target_is_directory=True)
    with pytest.raises(LoRAFileError, match="outside the allowed folders"):
        save_lora(loras / "escape" / "x.safetensors", w, allowed_dirs=[str(loras)])
    assert list(other.iterdir()) == []
    save_lora(other / "x.safetensors", w)  # without allowed_dirs any folder is fine
    with pytest.raises(LoRAFileError, match=r"cannot load LoRA.*outside the allowed folders"):
        load_lora(other / "x.safetensors", allowed_dirs=[loras])
    assert load_lora(loras / "ok.safetensors", allowed_dirs=[loras, other]).rank == 4
    assert load_lora(loras / "ok.safetensors", allowed_dirs=loras).rank == 4  # one folder, not a list
    with pytest.raises(LoRAFileError, match="none are configured"):
        load_lora(loras / "ok.safetensors", allowed_dirs=[])


@pytest.mark.parametrize("name", ["clip0", "clip0.safetensors", "my.motion.lora", "Clip 0 (v2).SAFETENSORS"])
def test_check_lora_name_accepts_bare_names(name):
    out = check_lora_name(name)
    assert out.lower().endswith(".safetensors") and out.startswith(name.split(".")[0])
    assert check_lora_name(out) == out


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("../evil", "not a bare file name"),
        ("sub/clip0", "not a bare file name"),
        ("sub\\clip0", "not a bare file name"),
        ("/etc/passwd", "not a bare file name"),
        ("C:clip", "not a bare file name"),
        ("..", "not a bare file name"),
        ("a\x00b", "not a bare file name"),
        ("", "empty"),
        ("   ", "empty"),
        (" clip", "space"),
        ("clip.", "ends with a dot"),
        ("CON", "reserved on Windows"),
        ("com1.safetensors", "reserved on Windows"),
    ],
)
def test_check_lora_name_refuses_paths_and_bad_names(name, match):
    with pytest.raises(LoRAFileError, match=match):
        check_lora_name(name)


# ------------------------------------------------------------------------------- bad files on load


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(LoRAFileError, match="no LoRA file at"):
        load_lora(tmp_path / "nope.safetensors")
    with pytest.raises(LoRAFileError, match="is not a file"):
        load_lora(tmp_path)


@pytest.mark.parametrize("cut", [0.5, 0.01, 0.0])
def test_truncated_file_is_reported_as_damaged(tmp_path, cut):
    path = save_lora(tmp_path / "m.safetensors", make_weights())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(LoRAFileError, match=r"not a readable safetensors file.*truncated or damaged"):
        load_lora(path)


def test_random_bytes_are_reported_as_not_safetensors(tmp_path):
    path = tmp_path / "r.safetensors"
    path.write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy().tobytes()
    )
    with pytest.raises(LoRAFileError, match="not a readable safetensors file"):
        load_lora(path)


def test_garbled_header_is_reported(tmp_path):
    path = save_lora(tmp_path / "m.safetensors", make_weights())
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    data[8 + n // 2] = ord("\x01")  # break the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(I2VEditError, match="not a readable safetensors file"):
        load_lora(path)


class _Payload:
    """Unpickling this would create a marker file: proof that a loader unpickled it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("zipfile", [True, False])
def test_pickle_file_is_refused_without_unpickling(tmp_path, zipfile):
    marker = tmp_path / "unpickled"
    path = tmp_path / "evil.safetensors"
    torch.save({"x": _Payload(marker)}, path, _use_new_zipfile_serialization=zipfile)
    with pytest.raises(LoRAFileError, match=r"pickle file \(torch\.save\).*not opened"):
        load_lora(path)
    assert not marker.exists()


def _write_raw(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_keys_of_other_lora_kinds_are_named(tmp_path):
    kohya = _write_raw(
        tmp_path / "k.safetensors",
        {
            "lora_unet_input_blocks_1_1_time_stack_0_attn1_to_q.lora_up.weight": torch.zeros(8, 4),
            "lora_unet_input_blocks_1_1_time_stack_0_attn1_to_q.lora_down.weight": torch.zeros(4, 8),
        },
    )
    with pytest.raises(LoRAFileError, match=r"2 of the 2 keys.*lora_unet_input_blocks_1_1.*kohya-style"):
        load_lora(kohya)
    peft = _write_raw(
        tmp_path / "p.safetensors",
        {
            "unet.down_blocks.0.attentions.0.temporal_transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(
                4, 8
            )
        },
    )
    with pytest.raises(LoRAFileError, match="peft/diffusers-style"):
        load_lora(peft)
    model = _write_raw(
        tmp_path / "svd.safetensors",
        {"model.diffusion_model.input_blocks.1.1.time_stack.0.attn1.to_q.weight": torch.zeros(8, 8)},
    )
    with pytest.raises(LoRAFileError, match="a model checkpoint"):
        load_lora(model)
    with pytest.raises(LoRAFileError, match="holds no LoRA weights"):
        load_lora(_write_raw(tmp_path / "e.safetensors", {}))


def test_lora_for_other_layers_is_named(tmp_path):
    # A ComfyUI-style LoRA of the right key form, but on spatial attention (e.g. an image-model LoRA).
    name = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    path = _write_raw(
        tmp_path / "sd.safetensors",
        {name + ".lora_up.weight": torch.zeros(8, 4), name + ".lora_down.weight": torch.zeros(4, 8)},
    )
    with pytest.raises(LoRAFileError, match=r"not temporal-block layers.*transformer_blocks\.0\.attn1\.to_q"):
        load_lora(path)


def test_unpaired_and_rank_mismatched_layers_are_named(tmp_path):
    sd = make_weights(svd_shapes("temporal_attention")).state_dict()
    broken = dict(sd)
    del broken["diffusion_model.middle_block.1.time_stack.0.attn1.to_v.lora_down.weight"]
    with pytest.raises(
        LoRAFileError, match=r"lack their up or down.*middle_block\.1\.time_stack\.0\.attn1\.to_v \(no down\)"
    ):
        load_lora(_write_raw(tmp_path / "u.safetensors", broken))
    broken = dict(sd)
    broken["diffusion_model.middle_block.1.time_stack.0.attn1.to_v.lora_up.weight"] = torch.zeros(32, 3)
    with pytest.raises(
        LoRAFileError, match=r"middle_block\.1\.time_stack\.0\.attn1\.to_v: up \(32, 3\) has rank 3"
    ):
        load_lora(_write_raw(tmp_path / "r.safetensors", broken))
    broken = dict(sd)
    broken["diffusion_model.middle_block.1.time_stack.0.attn1.to_v.lora_up.weight"][0, 0] = float("inf")
    with pytest.raises(LoRAFileError, match="NaN or infinite"):
        load_lora(_write_raw(tmp_path / "n.safetensors", broken))


def test_metadata_that_contradicts_the_tensors_or_is_unknown_is_refused(tmp_path):
    w = make_weights(svd_shapes("temporal_attention"), **{**FIELDS, "target_set": "temporal_attention"})
    sd, meta = w.state_dict(), w.metadata()
    cases = [
        ({"i2vedit.rank": "8"}, "metadata says rank 8 but the tensors have rank 4"),
        ({"i2vedit.alpha": "2.0"}, "metadata says alpha '2.0' but the tensors have alpha 4.0"),
        ({"i2vedit.format": "something.else"}, "tagged 'something.else', not an I2VEdit motion LoRA"),
        ({"i2vedit.format_version": "2"}, "format version 2, newer than this pack reads.*update"),
        ({"i2vedit.targets": "spatial"}, "target set 'spatial', which this pack does not know"),
        ({"i2vedit.steps": "many"}, "'i2vedit.steps' is 'many', not an integer"),
        ({"i2vedit.resolution": "512*896"}, "not HxW"),
    ]
    for change, match in cases:
        path = _write_raw(tmp_path / "m.safetensors", sd, {**meta, **change})
        with pytest.raises(LoRAFileError, match=match):
            load_lora(path)
    # Recorded "temporal_attention" but holding ff layers too.
    full_sd = make_weights(rank=4).state_dict()
    with pytest.raises(LoRAFileError, match=r"trained on target set 'temporal_attention'.*outside it.*ff"):
        load_lora(_write_raw(tmp_path / "m.safetensors", full_sd, meta))


def test_comfyui_style_file_without_metadata_loads(tmp_path):
    """What ComfyUI's own LoRA training writes for these layers: same keys, no metadata, maybe no alpha."""
    sd = make_weights(rank=4, alpha=4).state_dict()
    sd = {k: v for k, v in sd.items() if not k.endswith(".alpha")}
    back = load_lora(_write_raw(tmp_path / "c.safetensors", sd, {"format": "pt"}))
    assert back.target_set is None and back.resolved_target_set() == "temporal"
    assert back.alpha == 4.0  # no alpha means scale 1, i.e. alpha = rank
    assert back.extra_metadata == {"format": "pt"}


# -------------------------------------------------------------------------------------- fitting


def test_check_lora_fits_accepts_a_matching_lora():
    shapes = svd_shapes()
    w = make_weights(shapes, rank=4, target_set="temporal")
    check_lora_fits(w, shapes, "temporal")
    check_lora_fits(w, shapes)
    bigger = {**shapes, "input_blocks.1.1.transformer_blocks.0.attn1.to_q": (8, 8)}  # non-targets are fine
    check_lora_fits(w, bigger, "temporal")


def test_check_lora_fits_names_layers_of_another_model():
    shapes = svd_shapes()
    w = make_weights(svd_shapes(base=16), rank=4)  # same layout, twice as wide: another model
    with pytest.raises(
        LoRAError, match=r"192 layers have other shapes.*\(LoRA 16×16, model 8×8\).*another model"
    ):
        check_lora_fits(w, shapes, "temporal")
    partial = dict(shapes)
    del partial["output_blocks.9.1.time_stack.0.attn1.to_q"]
    w = make_weights(shapes, rank=4)
    with pytest.raises(
        LoRAError, match=r"1 of its 192 layers do not exist.*output_blocks\.9\.1\.time_stack\.0\.attn1\.to_q"
    ):
        check_lora_fits(w, partial)


def test_check_lora_fits_reports_rank_target_set_and_missing_layers():
    shapes = svd_shapes(base=4)  # smallest layers 4×4
    with pytest.raises(LoRAError, match=r"rank larger than the layer.*\(rank 6 > 4\)"):
        check_lora_fits(make_weights(shapes, rank=6), shapes)
    attention = make_weights(
        svd_shapes("temporal_attention", base=4), rank=2, target_set="temporal_attention"
    )
    with pytest.raises(
        LoRAError, match=r"trained on target set 'temporal_attention' but 'temporal' is expected"
    ):
        check_lora_fits(attention, shapes, "temporal")
    check_lora_fits(attention, shapes, "temporal_attention")
    spatial = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    odd = make_weights({**svd_shapes(base=4), spatial: (4, 4)}, rank=2)  # no target set fits its layers
    with pytest.raises(
        LoRAError, match=r"1 layers are not in target set 'temporal': input_blocks\.1\.1\.transformer"
    ):
        check_lora_fits(odd, {**shapes, spatial: (4, 4)}, "temporal")
    w = make_weights(shapes, rank=2)
    del w.modules["middle_block.1.time_stack.0.ff.net.2"]
    with pytest.raises(
        LoRAError,
        match=r"lacks 1 of the model's 'temporal' layers.*middle_block\.1\.time_stack\.0\.ff\.net\.2",
    ):
        check_lora_fits(w, shapes, "temporal")


def test_check_lora_fits_takes_diffusers_names(tiny_diffusers_host):
    from i2vedit.lora.targets import target_shapes

    dif = target_shapes(tiny_diffusers_host.unet, "temporal", "diffusers")
    w = make_weights({to_comfy_name(n): s for n, s in dif.items()}, rank=8, target_set="temporal")
    check_lora_fits(w, dif, "temporal", naming="diffusers")
    with pytest.raises(I2VEditError, match="pass naming='diffusers'"):
        check_lora_fits(w, dif, "temporal")  # the names are diffusers names, the LoRA's are not


def test_validate_rank():
    shapes = svd_shapes()  # smallest layer 8×8
    assert validate_rank(8, shapes) == 8 and validate_rank(1, shapes) == 1
    with pytest.raises(
        LoRAError, match=r"rank 9 is larger than the smallest target layer allows \(.*×8, at most rank 8\)"
    ):
        validate_rank(9, shapes)
    for bad, match in ((0, "below 1"), (-3, "below 1"), (2.5, "not an integer"), (True, "not an integer")):
        with pytest.raises(LoRAError, match=match):
            validate_rank(bad, shapes)
    with pytest.raises(LoRAError, match="no target layers"):
        validate_rank(4, {})


# -------------------------------------------------------------------------------------- ComfyUI


@pytest.mark.usefixtures("comfy")
def test_comfyui_applies_the_file_as_W_plus_up_down(tmp_path):
    """ComfyUI's own LoRA loader maps every key of our file and patches W + (alpha/rank)·up·down."""
    import logging

    import comfy.sd
    import comfy.utils
    from fixtures.tiny_comfy import build_svd_patcher

    from i2vedit.hosts.diffusers import tiny
    from i2vedit.lora.targets import target_shapes

    patcher = build_svd_patcher(tiny.MODEL_CHANNELS, tiny.CONTEXT_DIM, tiny.HEAD_DIM, device="cpu")
    unet = patcher.model.diffusion_model
    shapes = target_shapes(unet, "temporal", "comfy")
    assert len(shapes) == 192
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in shapes:
            unet.get_submodule(name).weight.copy_(torch.randn(shapes[name], generator=g))
    w = make_weights(shapes, rank=4, alpha=2.0, target_set="temporal")
    path = save_lora(tmp_path / "m.safetensors", w)

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger().addHandler(handler)
    try:
        lora = comfy.utils.load_torch_file(str(path), safe_load=True)
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)
    finally:
        logging.getLogger().removeHandler(handler)
    assert not [r for r in records if "not loaded" in r.getMessage()]
    assert len(patched.patches) == 192
    name = "input_blocks.4.1.time_stack.0.attn2.to_k"
    key = f"diffusion_model.{name}.weight"
    before = unet.get_submodule(name).weight.detach().clone()
    patched.patch_weight_to_device(key, device_to="cpu")
    pair = w.modules[name]
    expected = before + (2.0 / 4) * pair.up @ pair.down
    torch.testing.assert_close(patched.model.get_parameter(key), expected, rtol=1e-5, atol=1e-5)
    patched.unpatch_model()
    assert os.path.getsize(path) > 0
