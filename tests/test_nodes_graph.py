"""The nodes inside a real ComfyUI (COMFYUI_PATH), called in-process on the tiny SVD.

The strongest check: a graph of single-stage nodes (select clip → SARP → invert → train → match,
chained over two clips with skip-interval K/V) gives exactly the all-in-one pipeline's video.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import sharpen_self_attention

from i2vedit.cli import demo_video
from i2vedit.method.controller import MatchConfig
from i2vedit.run.pipeline import EditSettings, edit_video
from i2vedit.run.stages import psnr
from i2vedit.seeds import Purpose, derived_seed

pytestmark = pytest.mark.usefixtures("comfy")

SEED, STEPS, LORA_STEPS, RANK, FPS = 7, 3, 2, 4, 8.0


@pytest.fixture(scope="module")
def tiny(comfy):
    from fixtures.tiny_comfy import build_tiny_comfy_host

    return sharpen_self_attention(build_tiny_comfy_host(seed=0, with_vae=True))


@pytest.fixture(scope="module")
def video():
    frames, _ = demo_video(7, (64, 64))
    edited = frames[:1].clone()
    edited[..., 16:40, 16:40, :] = torch.tensor([0.9, 0.2, 0.1])
    return frames, edited


def run(pack, node_id: str, **kw):
    cls = next(n for n in pack.NODES if n.define_schema().node_id == node_id)
    return cls.execute(**kw).result


def node_graph(pack, tiny, frames, edited, chunk: int):
    """Both clips through the single-stage nodes, wired as the 'every stage' workflow wires them."""
    m, cv, vae = tiny.patcher, tiny.clip_vision, tiny.vae
    count = run(pack, "I2VEditSelectClip", frames=frames, clip_length=chunk, overlap=1, index=0)[1]
    kv, prev, video, masks = None, None, None, None
    for i in range(count):
        clip = run(pack, "I2VEditSelectClip", frames=frames, clip_length=chunk, overlap=1, index=i)[0]
        sarp_seed = derived_seed(SEED, i, Purpose.SARP)
        perturbed = run(pack, "SARPPerturb", frames=clip, noise_scale=0.005, threshold=0.001, seed=sarp_seed)[
            0
        ]
        inv = run(pack, "EDMInvertSVD", model=m, clip_vision=cv, vae=vae, frames=perturbed, steps=STEPS,
                  memory_mode="recompute", seed=SEED, clip_index=i, skip_interval_kv=kv)[0]  # fmt: skip
        if i == 0:
            first_inv = inv
            skip_kv = run(pack, "SkipIntervalKVCache", first_clip_inversion=inv)[0]
        lora = run(pack, "TrainMotionLoRA", inversion=inv, steps=LORA_STEPS, rank=RANK, learning_rate=5e-4,
                   target_set="temporal", dropout=0.1, gradient_checkpointing=False, seed=SEED,
                   skip_interval_kv=skip_kv if i > 0 else None)[0]  # fmt: skip
        out, mask, _, prev = run(pack, "AttentionMatchSampler", model=m, inversion=inv, preset="local",
                                 min_cfg=1.0, max_cfg=2.0, fps=FPS, seed=SEED, edited_first_frame=edited,
                                 previous_clip=prev if i > 0 else None, lora=lora, skip_interval_kv=kv)  # fmt: skip
        if i == 0:
            kv = run(pack, "SkipIntervalKVCache", first_clip_inversion=first_inv, first_clip_edit=prev)[0]
            video, masks = out, mask
        else:
            video, masks = run(pack, "I2VEditStitchClips", first=video, second=out, overlap=1,
                               first_mask=masks, second_mask=mask)  # fmt: skip
    return video, masks, count


def test_single_stage_nodes_equal_the_pipeline_over_two_clips(pack, tiny, video):
    frames, edited = video
    chunk = 4
    settings = EditSettings(chunk=chunk, steps=STEPS, match=MatchConfig.preset("local"), lora_steps=LORA_STEPS,
                            lora_rank=RANK, seed=SEED, train_size=(64, 64))  # fmt: skip
    ref = edit_video(tiny, frames, FPS, [edited], settings)
    got, masks, count = node_graph(pack, tiny, frames, edited, chunk)
    assert count == ref.report["clips"] == 2
    assert got.shape == ref.videos[0].shape == frames.shape
    torch.testing.assert_close(got, ref.videos[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(masks, ref.masks[0], atol=1e-5, rtol=0)
    assert (got - frames).abs().mean() > 1e-3  # an edit really happened


def test_inversion_check_reports_psnr_of_a_plain_euler_reconstruction(pack, tiny, video):
    import comfy.k_diffusion.sampling as kd

    from i2vedit.svd import LATENT_SCALE

    frames, _ = video
    clip = frames[:4]
    state = run(pack, "EDMInvertSVD", model=tiny.patcher, clip_vision=tiny.clip_vision, vae=tiny.vae, frames=clip,
                steps=STEPS, memory_mode="recompute", seed=SEED, clip_index=0)[0]  # fmt: skip
    recon, value = run(pack, "I2VEditInversionCheck", inversion=state, source_frames=clip)
    inv = state.inversion
    # ComfyUI's own Euler sampler from x_T over the same σ, under the source conditioning, no CFG
    latents = tiny.sample(kd.sample_euler, inv.x_T, inv.denoise_sigmas(), inv.cond)
    expected = tiny.vae_decode(latents / LATENT_SCALE)
    torch.testing.assert_close(recon, expected, atol=1e-4, rtol=0)
    assert value == pytest.approx(psnr(expected, clip), abs=1e-3)


def test_fit_restore_round_trip_and_resized_edit(pack, video, caplog):
    _, edited = video
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 50), torch.linspace(0, 1, 90), indexing="ij")
    wide = torch.stack([yy, xx, yy * xx], -1).expand(3, 50, 90, 3).contiguous()  # smooth: resizing keeps it
    small_edit = edited[:, :40, :40]
    fitted, fitted_edit, plan = run(pack, "I2VEditFitFrames", frames=wide, edited_first_frame=small_edit,
                                    max_side=128, width=0, height=0, mode="pad")  # fmt: skip
    assert fitted.shape[1] % 64 == 0 and fitted.shape[2] % 64 == 0 and fitted_edit.shape == fitted[:1].shape
    assert "resizing it to the video's size" in caplog.text
    restored, mask = run(pack, "I2VEditRestoreFrames", frames=fitted, resize=plan)
    assert restored.shape == wide.shape and mask.shape == wide.shape[:3]
    assert (restored - wide).abs().max() < 0.02


def test_sample_frames_and_select_clip(pack):
    frames = torch.arange(30.0).view(30, 1, 1, 1).expand(30, 64, 64, 3) / 30
    out, fps, count = run(pack, "I2VEditSampleFrames", frames=frames, fps=30.0, start_seconds=0.5,
                          end_seconds=-1.0, sample_fps=10.0)  # fmt: skip
    assert fps == 10.0 and count == 5 and out.shape[0] == 5
    assert torch.allclose(out[:, 0, 0, 0] * 30, torch.tensor([15.0, 18, 21, 24, 27]))
    with pytest.raises(ValueError, match="clip 9 does not exist"):
        run(pack, "I2VEditSelectClip", frames=frames, clip_length=14, overlap=1, index=9)


def test_bad_inputs_are_refused_before_any_model_call(pack, tiny, video):
    from fixtures.tiny_comfy import build_tiny_comfy_host

    frames, edited = video
    clip = frames[:4]
    state = run(pack, "EDMInvertSVD", model=tiny.patcher, clip_vision=tiny.clip_vision, vae=tiny.vae, frames=clip,
                steps=2, memory_mode="recompute", seed=0, clip_index=0)[0]  # fmt: skip
    kw = dict(model=tiny.patcher, inversion=state, preset="local", min_cfg=1.0, max_cfg=2.0, fps=FPS, seed=0)
    with pytest.raises(ValueError, match="pass both through 'Fit Frames"):
        run(pack, "AttentionMatchSampler", edited_first_frame=edited[:, :, :32], **kw)
    with pytest.raises(ValueError, match=r"edited_first_frame.*or previous_clip"):
        run(pack, "AttentionMatchSampler", **kw)
    other = build_tiny_comfy_host(seed=1, with_vae=False)
    with pytest.raises(ValueError, match="share base weights"):
        run(pack, "AttentionMatchSampler", **dict(kw, model=other.patcher), edited_first_frame=edited)
    with pytest.raises(ValueError, match="not a bare file name"):
        run(pack, "TrainMotionLoRA", inversion=state, steps=100000, rank=4, learning_rate=5e-4,
            target_set="temporal", dropout=0.1, gradient_checkpointing=False, seed=0, save_name="../evil")  # fmt: skip
    with pytest.raises(ValueError, match=r"multiples? of 64"):
        run(pack, "EDMInvertSVD", model=tiny.patcher, clip_vision=tiny.clip_vision, vae=tiny.vae,
            frames=clip[:, :50], steps=2, memory_mode="recompute", seed=0, clip_index=0)  # fmt: skip
    with pytest.raises(ValueError, match=r"not Stable Video Diffusion|expected a ComfyUI MODEL"):
        run(pack, "EDMInvertSVD", model=tiny.clip_vision, clip_vision=tiny.clip_vision, vae=tiny.vae,
            frames=clip, steps=2, memory_mode="recompute", seed=0, clip_index=0)  # fmt: skip


@pytest.fixture(scope="module")
def clip0(pack, tiny, video):
    """The first clip inverted (2 steps) and its motion LoRA (1 step): (inversion, lora, LoRA'd MODEL)."""
    inv0 = run(pack, "EDMInvertSVD", model=tiny.patcher, clip_vision=tiny.clip_vision, vae=tiny.vae,
               frames=video[0][:4], steps=2, memory_mode="recompute", seed=0, clip_index=0)[0]  # fmt: skip
    lora, lora_model = run(pack, "TrainMotionLoRA", inversion=inv0, steps=1, rank=4, learning_rate=5e-4,
                           target_set="temporal", dropout=0.1, gradient_checkpointing=False, seed=0)  # fmt: skip
    return inv0, lora, lora_model


@contextlib.contextmanager
def model_calls(host):
    """Records every forward of the host's UNet, VAE encoder/decoder and CLIP vision (hooks on the real modules)."""
    calls: list[str] = []
    modules = [
        host.patcher.model.diffusion_model,
        *host.vae.first_stage_model.children(),
        host.clip_vision.model,
    ]
    handles = [m.register_forward_pre_hook(lambda m, _: calls.append(type(m).__name__)) for m in modules]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def progress_hook(fn):
    """ComfyUI's real global progress hook set to ``fn(value, total)`` (what the server's hook receives)."""
    import comfy.utils

    before = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview=None, **_: fn(value, total))
    try:
        yield
    finally:
        comfy.utils.set_progress_bar_global_hook(before)


def test_lora_of_another_clip_or_model_is_refused(pack, tiny, video, clip0):
    frames, edited = video
    clip = frames[:4]
    inv0, lora, _ = clip0
    inv1 = run(pack, "EDMInvertSVD", model=tiny.patcher, clip_vision=tiny.clip_vision, vae=tiny.vae, frames=clip,
               steps=2, memory_mode="recompute", seed=0, clip_index=1)[0]  # fmt: skip
    kw = dict(
        model=tiny.patcher,
        preset="local",
        min_cfg=1.0,
        max_cfg=2.0,
        fps=FPS,
        seed=0,
        edited_first_frame=edited,
    )
    with pytest.raises(ValueError, match="trained on clip 0, the inversion is of clip 1"):
        run(pack, "AttentionMatchSampler", inversion=inv1, lora=lora, **kw)
    foreign = type(lora)(**{**lora.__dict__, "model_fingerprint": "0123456789abcdef"})
    with pytest.raises(ValueError, match="trained on another model"):
        run(pack, "AttentionMatchSampler", inversion=inv0, lora=foreign, **kw)


def test_every_input_has_a_tooltip_and_every_node_one_category_root(pack):
    ids = set()
    for cls in pack.NODES:
        schema = cls.define_schema()
        ids.add(schema.node_id)
        assert schema.category.split("/")[0] == "I2VEdit" and schema.description
        for item in [*schema.inputs, *schema.outputs]:
            assert item.tooltip, f"{schema.node_id}.{item.id} has no tooltip"
    assert {
        "SARPPerturb",
        "EDMInvertSVD",
        "TrainMotionLoRA",
        "SkipIntervalKVCache",
        "AttentionMatchSampler",
    } <= ids


def test_a_lora_already_on_the_model_is_refused_before_any_model_call(pack, tiny, video, clip0):
    """Train Motion LoRA's MODEL output, or stock LoraLoaderModelOnly with the saved file, plus the same 'lora'."""
    from i2vedit.lora.file import LoRAPair

    comfy_nodes = importlib.import_module("nodes")  # ComfyUI's nodes.py: COMFYUI_PATH comes first on sys.path
    assert hasattr(comfy_nodes, "LoraLoaderModelOnly"), comfy_nodes.__file__

    _, edited = video
    inv0, lora, trained_model = clip0
    run(pack, "I2VEditSaveMotionLoRA", lora=lora, name="applied_twice", overwrite=True)
    stock = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(
        tiny.patcher, "i2vedit/applied_twice.safetensors", 1.0
    )[0]
    other = type(lora)(**{**lora.__dict__, "modules": {k: LoRAPair(p.down, p.up + 0.01, p.alpha)
                                                       for k, p in lora.modules.items()}})  # fmt: skip
    kw = dict(
        inversion=inv0, preset="local", min_cfg=1.0, max_cfg=2.0, fps=FPS, seed=0, edited_first_frame=edited
    )
    fix = re.escape(
        "Connect the base MODEL (the one the inversion was made with) to 'model', or disconnect 'lora'."
    )
    with model_calls(tiny) as calls:
        with pytest.raises(ValueError, match=re.escape(
            "the MODEL already carries this motion LoRA (it is the MODEL output of 'Train Motion LoRA' (clip 0)); "
            "connected to 'lora' as well it would be applied twice. ") + fix):  # fmt: skip
            run(pack, "AttentionMatchSampler", model=trained_model, lora=lora, **kw)
        with pytest.raises(ValueError, match=re.escape(
            "the MODEL already carries this motion LoRA (for example through LoraLoaderModelOnly)")):  # fmt: skip
            run(pack, "AttentionMatchSampler", model=stock, lora=lora, **kw)
        with pytest.raises(ValueError, match=re.escape(
            f"the MODEL already carries a LoRA on {len(lora.modules)} of the {len(lora.modules)} layers this "
            "motion LoRA changes (for example through LoraLoaderModelOnly); with 'lora' as well, two motion "
            "LoRAs would be stacked.")):  # fmt: skip
            run(pack, "AttentionMatchSampler", model=stock, lora=other, **kw)
    assert calls == []
    # each alone is fine: the LoRA'd MODEL without 'lora' runs (and the counter does see model calls)
    with model_calls(tiny) as calls:
        run(pack, "AttentionMatchSampler", model=stock, **kw)
    assert "UNetModel" in calls


def test_all_in_one_progress_step_counts(pack):
    clip_step_counts, train_res_inversion_runs = (
        pack.edit_nodes.clip_step_counts,
        pack.edit_nodes.train_res_inversion_runs,
    )

    assert clip_step_counts(3, 25, 2, 250, False) == [325, 325, 325]
    assert clip_step_counts(2, 4, 1, 3, True) == [11, 15]  # the first clip's second inversion runs in clip 1
    assert clip_step_counts(1, 4, 1, 0, False) == [8]
    assert train_res_inversion_runs(2, 1, (64, 128), (64, 64), True)
    assert not train_res_inversion_runs(1, 1, (64, 128), (64, 64), True)  # one clip: no later clip trains
    assert not train_res_inversion_runs(2, 0, (64, 128), (64, 64), True)  # no LoRA
    assert not train_res_inversion_runs(2, 1, (64, 128), (64, 128), True)  # trains at the generation size
    assert not train_res_inversion_runs(2, 1, (64, 128), (64, 64), False)  # no skip-interval K/V


def test_all_in_one_node_restores_size_and_its_progress_ends_at_exactly_100(pack, tiny, video, monkeypatch):
    """Two clips of a 64×96 video made at 64×128, the LoRA trained at 64×64: every model step is one tick,
    the first clip's inversion at training size included, and a run restored from the reuse folder ends at
    100% too."""
    from i2vedit.lora.train import training_size

    pipeline = importlib.import_module("i2vedit_pack.i2vedit.run.pipeline")  # the pack's own core modules
    # a training area of 64×64 (the paper's is 512×896) so that the tiny run trains at another size
    monkeypatch.setattr(pipeline, "training_size", lambda h, w: training_size(h, w, area=64 * 64))
    frames, edited = video
    wide = torch.nn.functional.interpolate(frames[:3].movedim(-1, 1), size=(64, 96)).movedim(1, -1)
    edit = torch.nn.functional.interpolate(edited.movedim(-1, 1), size=(64, 96)).movedim(1, -1)
    node = next(n for n in pack.NODES if n.define_schema().node_id == "I2VEditVideo")
    kw = dict(model=tiny.patcher, clip_vision=tiny.clip_vision, vae=tiny.vae, frames=wide, fps=FPS,
              edited_first_frame=edit, clip_length=2, steps=2, preset="local", lora_steps=1, lora_rank=RANK,
              memory_mode="recompute", max_side=128, resize_mode="pad", max_cfg=2.0, seed=SEED,
              resume_name="progress_run")  # fmt: skip
    total = 2 * (2 + 1 + 2) + 2  # 2 clips × (inversion, LoRA, denoising) + the training-size inversion
    runs = []
    for _ in range(2):  # from scratch, then everything restored from output/i2vedit_runs/progress_run
        seen: list[tuple[int, int]] = []
        with progress_hook(lambda value, bar_total, seen=seen: seen.append((value, bar_total))):
            out = node.execute(**kw)
        runs.append((out, [v for v, t in seen if t == total], {t for _, t in seen}))
    (first, values, totals), (again, restored, _) = runs
    video_out, mask, fps, _, region = first.result
    assert video_out.shape == (3, 64, 96, 3) and mask.shape == (3, 64, 96) and fps == FPS
    assert torch.equal(region, torch.ones(3, 64, 96))  # no region lock
    assert first.ui.value.startswith("2 clips of 3 frames at 128×64")
    assert "invert_train_res" in first.ui.value  # the stage really ran
    assert total in totals
    assert values == list(range(1, total + 1))  # one tick per model step, 100% only after the last
    assert restored and restored[-1] == total and restored == sorted(restored)  # nothing ran, still 100%
    assert torch.equal(again.result[0], video_out)


def test_a_too_long_save_name_is_refused_before_training(pack, tiny, clip0):
    base = pack.common.folder(pack.common.LORA_FOLDER)
    inv0 = clip0[0]
    kw = dict(inversion=inv0, steps=1, rank=4, learning_rate=5e-4, target_set="temporal", dropout=0.1,
              gradient_checkpointing=False, seed=0)  # fmt: skip
    limit = pack.common.name_limit(base)
    assert limit <= 255 - 14  # room for the '.<name>.XXXXXXXX.tmp' file the save writes first
    with model_calls(tiny) as calls:
        with pytest.raises(ValueError, match=rf"the save_name 'x{{40}}…' is too long: .* takes 312 bytes, .* at most "
                           rf"{limit} .* Shorten it by at least {312 - limit} bytes\."):  # fmt: skip
            run(pack, "TrainMotionLoRA", save_name="x" * 300, **kw)
        over = "é" * ((limit - len(".safetensors")) // 2 + 1)  # few characters, too many bytes
        with pytest.raises(ValueError, match="is too long"):
            run(pack, "TrainMotionLoRA", save_name=over, **kw)
    assert calls == []
    longest = "y" * (limit - len(".safetensors"))
    run(pack, "TrainMotionLoRA", save_name=longest, **kw)
    assert os.path.isfile(os.path.join(base, longest + ".safetensors"))


def test_a_failed_final_save_keeps_the_trained_lora(pack, tiny, clip0):
    """Any error of the final save (here a real OSError, 'File name too long') falls back to the rescue."""
    from i2vedit.lora.file import load_lora

    base, name_limit = pack.common.folder(pack.common.LORA_FOLDER), pack.common.name_limit
    stem = "w" * (name_limit(base) - len(".safetensors"))  # the longest name: the rescue name must shorten it
    target = os.path.join(base, stem + ".safetensors")

    def break_the_target(value, total):  # while training runs, the target becomes a link to a too-long path
        if not os.path.lexists(target):
            os.symlink("/" + "a" * 300 + ".safetensors", target)

    try:
        with progress_hook(break_the_target), pytest.raises(ValueError) as err:
            run(pack, "TrainMotionLoRA", inversion=clip0[0], steps=1, rank=4, learning_rate=5e-4,
                target_set="temporal", dropout=0.1, gradient_checkpointing=False, seed=0, save_name=stem)  # fmt: skip
    finally:
        if os.path.islink(target):
            os.remove(target)
    message = str(err.value)
    assert message.startswith(f"could not save the trained LoRA as {target} (")  # today a bare OSError
    assert "File name too long" in message
    kept = re.search(r"It is kept as (\S+\.safetensors) instead \(Load Motion LoRA lists", message)[1]
    assert os.path.dirname(kept) == os.path.realpath(base) and "_unsaved_step1_" in os.path.basename(kept)
    assert len(os.fsencode(os.path.basename(kept))) <= name_limit(base)
    assert load_lora(kept).steps == 1


def test_empty_zero_size_or_non_finite_frames_are_refused_before_any_model_call(pack, tiny, video, clip0):
    frames, edited = video
    kw = dict(
        model=tiny.patcher, inversion=clip0[0], preset="local", min_cfg=1.0, max_cfg=2.0, fps=FPS, seed=0
    )
    video_kw = dict(model=tiny.patcher, clip_vision=tiny.clip_vision, vae=tiny.vae, fps=FPS, clip_length=4, steps=2,
                    preset="local", lora_steps=1, lora_rank=RANK, memory_mode="recompute", max_side=64,
                    resize_mode="pad", max_cfg=2.0, seed=SEED)  # fmt: skip
    nan_frames, inf_edit = frames[:4].clone(), edited.clone()
    nan_frames[2, 10, 10, 0] = float("nan")
    inf_edit[0, 3, 3, 2] = float("inf")
    with model_calls(tiny) as calls:
        with pytest.raises(
            ValueError, match=re.escape("edited_first_frame is an empty IMAGE batch (0 frames)")
        ):
            run(pack, "AttentionMatchSampler", edited_first_frame=edited[:0], **kw)
        with pytest.raises(
            ValueError, match="edited_first_frame has frames of 0×0 pixels, which hold no image"
        ):
            run(pack, "AttentionMatchSampler", edited_first_frame=torch.zeros(1, 0, 0, 3), **kw)
        with pytest.raises(ValueError, match="edited_first_frame has frames of 0×0 pixels"):
            run(pack, "I2VEditFitFrames", frames=frames[:4], edited_first_frame=torch.zeros(1, 0, 0, 3),
                max_side=64, width=0, height=0, mode="pad")  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(
            "edited_first_frame: 1 of 1 frames hold NaN or infinite values (frame index 0)")):  # fmt: skip
            run(pack, "AttentionMatchSampler", edited_first_frame=inf_edit, **kw)
        with pytest.raises(ValueError, match=re.escape("frames: 1 of 4 frames hold NaN or infinite values (frame "
                                                       "index 2); the node that made them failed")):  # fmt: skip
            run(pack, "I2VEditVideo", frames=nan_frames, edited_first_frame=edited, **video_kw)
        with pytest.raises(ValueError, match=re.escape("edited_first_frame: 1 of 1 frames hold NaN")):
            run(pack, "I2VEditVideo", frames=frames[:4], edited_first_frame=inf_edit, **video_kw)
        with pytest.raises(ValueError, match=re.escape("frames is an empty IMAGE batch (0 frames)")):
            run(pack, "I2VEditVideo", frames=frames[:0], edited_first_frame=edited, **video_kw)
    assert calls == []


def test_all_in_one_node_takes_a_video_and_returns_one_with_the_sources_audio(pack, tiny, video, tmp_path):
    """LoadVideo → EditVideo.video → SaveVideo: a real clip's frames, exact rate and sound go through."""
    import av
    from comfy_api.latest import InputImpl
    from fixtures.real_clips import BUNNY, real_clip

    from i2vedit.io.video import read_video_clip, write_video

    source = read_video_clip(real_clip(BUNNY), start_t=1.0, max_frames=3, size=(36, 64))  # 5.1 sound
    path = tmp_path / "source.mp4"
    write_video(path, source.frames, source.fps, source.audio)
    _, edited = video
    kw = dict(model=tiny.patcher, clip_vision=tiny.clip_vision, vae=tiny.vae, fps=1.0,
              edited_first_frame=edited, clip_length=3, steps=2, preset="local", lora_steps=0, lora_rank=RANK,
              memory_mode="recompute", max_side=64, resize_mode="pad", max_cfg=2.0, seed=SEED)  # fmt: skip
    frames, mask, fps, out, _ = run(pack, "I2VEditVideo", video=InputImpl.VideoFromFile(str(path)), **kw)
    assert frames.shape == (3, 36, 64, 3) and mask.shape == (3, 36, 64) and fps == 25.0  # not the fps input
    assert isinstance(out, InputImpl.VideoFromFile)  # written clip by clip, never held whole
    parts = out.get_components()
    assert parts.images.shape == frames.shape and parts.frame_rate == 25
    assert float((parts.images - frames).abs().mean()) < 0.03  # the same frames, through H.264
    assert parts.audio["sample_rate"] == 48000 and parts.audio["waveform"].shape[1] == 6  # the 5.1 sound kept
    assert abs(parts.audio["waveform"].shape[2] - 3 * 48000 / 25) <= 48000 / 25
    out.save_to(str(tmp_path / "edited.mp4"))  # as SaveVideo does
    with av.open(str(tmp_path / "edited.mp4")) as container:
        assert [s.codec_context.name for s in container.streams] == ["h264", "aac"]
        assert container.streams.video[0].frames == 3
    first, *_, only_file, regions = run(
        pack, "I2VEditVideo", video=InputImpl.VideoFromFile(str(path)), image_outputs=False, **kw
    )
    assert first.shape == (1, 36, 64, 3) and regions.shape == (1, 36, 64)  # the first frame only
    assert torch.equal(first, frames[:1]) and only_file.get_components().images.shape[0] == 3
    with pytest.raises(ValueError, match="neither of frames and video are connected; connect exactly one"):
        run(pack, "I2VEditVideo", **kw)
    with pytest.raises(ValueError, match="both of frames and video are connected"):
        run(pack, "I2VEditVideo", frames=frames, video=InputImpl.VideoFromFile(str(path)), **kw)


def test_auto_region_mask_node_follows_the_square_and_the_all_in_one_node_locks_the_rest(pack, tiny):
    """Auto Region Mask → I2VEditVideo.region_mask (region_lock = mask): outside the region the output is
    the source's pixels exactly, inside the edit acts; a mask that would be ignored is refused."""
    from i2vedit.io.synthetic import moving_square

    frames, square = moving_square(10, (128, 192))
    edited = demo_video(10, (128, 192))[1]
    (region,) = run(
        pack, "I2VEditAutoRegionMask", frames=frames, edited_first_frame=edited, threshold=0.1, dilate=2
    )
    assert region.shape == (10, 128, 192)
    grown = torch.nn.functional.max_pool2d(square.float()[:, None], 5, 1, 2)[:, 0] > 0
    for t in range(10):
        inter = float(((region[t] > 0.5) & grown[t]).sum())
        assert inter / float(((region[t] > 0.5) | grown[t]).sum()) >= 0.8, t
    kw = dict(model=tiny.patcher, clip_vision=tiny.clip_vision, vae=tiny.vae, frames=frames, fps=FPS,
              edited_first_frame=edited, clip_length=10, steps=2, preset="local", lora_steps=0, lora_rank=RANK,
              memory_mode="recompute", max_side=128, resize_mode="pad", max_cfg=2.0, seed=SEED)  # fmt: skip
    out, _, _, _, used = run(pack, "I2VEditVideo", region_lock="mask", region_mask=region, **kw)
    outside = (region == 0)[..., None].expand_as(frames)
    assert torch.equal(used, region)
    assert torch.equal(out[outside], frames[outside])
    assert not torch.allclose(out[~outside], frames[~outside], atol=1e-3)
    with pytest.raises(ValueError, match="no region_mask is connected"):
        run(pack, "I2VEditVideo", region_lock="mask", **kw)
    with pytest.raises(ValueError, match="region_lock is 'off'"):
        run(pack, "I2VEditVideo", region_mask=region, **kw)


def test_prepare_only_fills_the_run_folder_and_the_denoising_run_uses_it(pack, tiny, video):
    """A 'prepare clips' instance (prepare_only) then the denoising run on the same resume_name: the same video
    as one run that does everything, nothing prepared twice."""
    import shutil
    import uuid

    import folder_paths

    frames, edited = video
    kw = dict(model=tiny.patcher, clip_vision=tiny.clip_vision, vae=tiny.vae, frames=frames[:5], fps=FPS,
              edited_first_frame=edited, clip_length=3, steps=2, preset="local", lora_steps=1, lora_rank=RANK,
              memory_mode="recompute", max_side=64, resize_mode="pad", max_cfg=2.0, seed=SEED)  # fmt: skip
    names = [f"prep_{uuid.uuid4().hex[:8]}", f"whole_{uuid.uuid4().hex[:8]}"]
    try:
        node = next(n for n in pack.NODES if n.define_schema().node_id == "I2VEditVideo")
        prepared = node.execute(**kw, resume_name=names[0], prepare_only=True)
        assert prepared.ui.value.startswith("prepared clips [0, 1] of 2")
        assert prepared.result[0].shape == (1, 64, 64, 3)
        run = Path(folder_paths.get_output_directory()) / "i2vedit_runs" / names[0]
        stamps = {p: p.stat().st_mtime_ns for p in run.glob("clip_*/*.safetensors")}
        assert len(stamps) == 4  # two clips' inversions and LoRAs
        denoised = node.execute(**kw, resume_name=names[0])
        whole = node.execute(**kw, resume_name=names[1])
        # bit for bit: the whole run's latents reached the VAE in another memory layout than the prepared
        # run's, and ComfyUI's decode gave other last bits (≤ 6e-7) until the host made its input contiguous
        assert torch.equal(denoised.result[0], whole.result[0])
        assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # read, not made again
        with pytest.raises(ValueError, match="prepare_only needs a run folder"):
            node.execute(**kw, prepare_only=True)
    finally:
        for name in names:
            shutil.rmtree(
                Path(folder_paths.get_output_directory()) / "i2vedit_runs" / name, ignore_errors=True
            )
