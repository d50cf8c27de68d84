import itertools
import math
import random

import pytest
import torch

from i2vedit.errors import I2VEditError
from i2vedit.io.frames import (
    ResizePlan,
    check_size,
    clip_ranges,
    fit_size,
    from_bchw,
    from_signed,
    make_resize_plan,
    sample_frame_indices,
    stack_frames,
    stitch_clips,
    to_bchw,
    to_signed,
    valid_size,
)


def smooth_frames(f: int, h: int, w: int) -> torch.Tensor:
    """Low-frequency RGB content in [0, 1], different on every frame."""
    y = torch.linspace(0, 1, h).view(1, h, 1)
    x = torch.linspace(0, 1, w).view(1, 1, w)
    t = torch.arange(f, dtype=torch.float32).view(f, 1, 1) / max(f, 1)
    r = 0.5 + 0.4 * torch.sin(2 * math.pi * (x + t))
    g = (0.2 + 0.6 * y).expand(f, h, w)
    b = 0.3 + 0.4 * x * y + 0.1 * t
    return torch.stack([r.expand(f, h, w), g, b.expand(f, h, w)], dim=-1).contiguous()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a - b) ** 2).item()
    return 10 * math.log10(1.0 / mse)


# sample_frame_indices


def test_sample_whole_video_at_native_fps_is_every_frame():
    assert sample_frame_indices(12, 10.0) == list(range(12))


def test_sample_hand_computed_range():
    # 0.2-0.8 s at 10 fps native, sampled at 5 fps: int(0.6 * 5) = 3 frames from linspace(2, 8, 3).
    assert sample_frame_indices(10, 10.0, start_t=0.2, end_t=0.8, sample_fps=5.0) == [2, 4, 6]


def test_sample_authors_example():
    # 10 s at 30 fps, first 8.4 s sampled at 2.5 fps: 21 frames, 12 native frames apart.
    indices = sample_frame_indices(300, 30.0, start_t=0.0, end_t=8.4, sample_fps=2.5)
    assert len(indices) == 21
    assert indices == list(range(0, 252, 12))


def test_sample_end_past_video_is_clamped_to_duration():
    assert sample_frame_indices(20, 10.0, end_t=100.0) == list(range(20))


def test_sample_fps_above_native_is_refused_instead_of_repeating_frames():
    """24 fps on an 8 fps source used to triple every frame without a word (nodes and CLI alike)."""
    with pytest.raises(I2VEditError, match=r"above the frame rate of the video \(5 fps\)"):
        sample_frame_indices(5, 5.0, sample_fps=10.0)
    assert sample_frame_indices(5, 5.0, sample_fps=5.0) == [0, 1, 2, 3, 4]
    assert len(sample_frame_indices(300, 30000 / 1001, sample_fps=30000 / 1001)) == 300


@pytest.mark.parametrize("kwargs", [{"start_t": math.nan}, {"end_t": math.nan}, {"sample_fps": math.inf}])
def test_sample_times_and_rates_that_are_not_finite_are_refused(kwargs):
    with pytest.raises(I2VEditError, match="not a finite number"):
        sample_frame_indices(20, 10.0, **kwargs)


def test_sample_properties_over_many_cases():
    rng = random.Random(0)
    for _ in range(500):
        native = rng.choice([8.0, 12.5, 24.0, 25.0, 29.97, 30.0, 60.0])
        num_frames = rng.randint(1, 400)
        duration = num_frames / native
        start = rng.uniform(0, duration * 0.9)
        end = rng.choice([-1.0, rng.uniform(start + 1e-3, duration * 1.5)])
        fps = rng.choice([-1.0, 1.0, 2.5, 7.0, native, 2 * native])
        if fps > native:
            with pytest.raises(I2VEditError, match="above the frame rate of the video"):
                sample_frame_indices(num_frames, native, start, end, fps)
            continue
        eff_end = duration if end == -1 else min(duration, end)
        eff_fps = native if fps == -1 else fps
        expected = int((eff_end - start) * eff_fps)
        if start >= eff_end or expected == 0:
            with pytest.raises(I2VEditError):
                sample_frame_indices(num_frames, native, start, end, fps)
            continue
        indices = sample_frame_indices(num_frames, native, start, end, fps)
        assert len(indices) == expected
        assert indices == sorted(indices)
        assert all(0 <= i <= num_frames - 1 for i in indices)
        assert indices[0] == min(int(start * native), num_frames - 1)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"start_t": -0.5}, "negative"),
        ({"start_t": 5.0}, "lasts 2 s"),
        ({"start_t": 1.0, "end_t": 0.5}, "before the end time"),
        ({"sample_fps": 0.0}, "-1 for the native"),
        ({"sample_fps": -2.0}, "positive sample fps"),
        ({"end_t": -3.0}, "-1 for the whole video"),
    ],
)
def test_sample_bad_arguments_raise_clear_errors(kwargs, fragment):
    with pytest.raises(I2VEditError, match=fragment):
        sample_frame_indices(20, 10.0, **kwargs)


def test_sample_bad_native_fps():
    with pytest.raises(I2VEditError, match="fixed frame rate"):
        sample_frame_indices(20, 0.0)


def test_sample_zero_frames_says_what_would_work():
    with pytest.raises(I2VEditError) as info:
        sample_frame_indices(20, 10.0, start_t=0.0, end_t=0.1, sample_fps=1.0)
    message = str(info.value)
    assert "gives no frames" in message
    assert "at least 1 s" in message
    assert "sample fps of at least 10" in message


# clip_ranges and stitch_clips


def test_clip_ranges_examples():
    assert clip_ranges(21, 11, 1) == [(0, 11), (10, 21)]
    assert clip_ranges(5, 11, 1) == [(0, 5)]
    assert clip_ranges(25, 11, 1) == [(0, 11), (10, 21), (20, 25)]
    assert clip_ranges(22, 11, 0) == [(0, 11), (11, 22)]
    assert clip_ranges(12, 11, 3) == [(0, 11), (8, 12)]


def test_clip_ranges_never_makes_an_overlap_only_clip():
    # 11 frames fill exactly one clip; a second clip would hold only the overlap frame.
    assert clip_ranges(11, 11, 1) == [(0, 11)]
    assert clip_ranges(1, 2, 1) == [(0, 1)]


@pytest.mark.parametrize(
    ("num_frames", "length", "overlap", "fragment"),
    [
        (10, 1, 0, "at least 2"),
        (10, 4, -1, "negative"),
        (10, 4, 4, "at most 3"),
        (0, 4, 1, "at least one frame"),
    ],
)
def test_clip_ranges_bad_arguments(num_frames, length, overlap, fragment):
    with pytest.raises(I2VEditError, match=fragment):
        clip_ranges(num_frames, length, overlap)


def test_clip_ranges_properties():
    for num_frames, length in itertools.product(range(1, 40), range(2, 14)):
        for overlap in range(length):
            ranges = clip_ranges(num_frames, length, overlap)
            assert ranges[0][0] == 0
            assert ranges[-1][1] == num_frames
            for start, end in ranges:
                assert 0 < end - start <= length
            for (s0, e0), (s1, e1) in itertools.pairwise(ranges):
                assert e0 - s0 == length  # only the last clip may be short
                assert s1 == e0 - overlap  # stride is length - overlap
                assert e1 > e0  # every later clip adds new frames


def test_split_then_stitch_round_trip_is_exact():
    gen = torch.Generator().manual_seed(0)
    for num_frames, length in itertools.product([1, 2, 5, 11, 14, 21, 33], [2, 3, 8, 11, 14]):
        for overlap in {0, 1, length // 2, length - 1}:
            frames = torch.rand(num_frames, 4, 5, 3, generator=gen)
            clips = [frames[s:e] for s, e in clip_ranges(num_frames, length, overlap)]
            stitched = stitch_clips(clips, overlap)
            assert stitched.shape[0] == num_frames
            assert torch.equal(stitched, frames)


def test_stitch_rejects_clip_with_only_overlap_frames():
    clips = [torch.zeros(4, 2, 2, 3), torch.zeros(1, 2, 2, 3)]
    with pytest.raises(I2VEditError, match="clip 1 has 1 frames"):
        stitch_clips(clips, overlap=1)


def test_stitch_rejects_mismatched_frame_sizes():
    clips = [torch.zeros(4, 2, 2, 3), torch.zeros(4, 2, 3, 3)]
    with pytest.raises(I2VEditError, match="clip 1 has frames of shape"):
        stitch_clips(clips, overlap=1)


def test_stitch_rejects_no_clips():
    with pytest.raises(I2VEditError, match="at least one clip"):
        stitch_clips([], overlap=1)


# sizes


def test_valid_size_rounds_to_nearest_multiple():
    assert valid_size(576, 1000) == (576, 1024)
    assert valid_size(100, 95) == (128, 64)
    assert valid_size(10, 31) == (64, 64)
    assert valid_size(96, 160) == (128, 192)  # halfway rounds up
    assert valid_size(50, 70, multiple=8) == (48, 72)


def test_check_size_accepts_multiples():
    check_size(576, 1024)
    check_size(64, 704)


def test_check_size_error_names_nearest_sizes():
    with pytest.raises(I2VEditError) as info:
        check_size(576, 1000)
    assert str(info.value) == "576×1000 is not a multiple of 64; use 576×1024 or 576×960."


def test_check_size_error_when_both_sides_are_off():
    with pytest.raises(I2VEditError) as info:
        check_size(600, 1000)
    message = str(info.value)
    assert message.startswith("600×1000 is not a multiple of 64; use 576×1024")
    assert "576×960" in message and "640×1024" in message


def test_fit_size_examples():
    assert fit_size(1080, 1920) == (576, 1024)
    assert fit_size(1920, 1080) == (1024, 576)
    assert fit_size(480, 640) == (768, 1024)
    assert fit_size(500, 500) == (1024, 1024)
    assert fit_size(1080, 1920, max_side=768) == (448, 768)
    assert fit_size(10, 4000) == (64, 1024)


def test_fit_size_properties():
    for h, w in itertools.product([37, 240, 480, 720, 1080, 1500, 2160], [37, 320, 640, 1280, 1920, 3840]):
        for max_side in (512, 1000, 1024):
            fh, fw = fit_size(h, w, max_side=max_side)
            assert fh % 64 == 0 and fw % 64 == 0
            assert max(fh, fw) <= max_side
            assert max(fh, fw) == max_side // 64 * 64
            if min(fh, fw) > 64:
                # short side is within half a multiple of the exact aspect-preserving value
                exact = max(fh, fw) * min(h, w) / max(h, w)
                assert abs(min(fh, fw) - exact) <= 32 + 1e-6
            assert (fh >= fw) == (h >= w) or h == w


# resize plans


def test_pad_plan_without_resizing_round_trip_is_exact():
    frames = torch.rand(3, 100, 150, 3)
    plan = make_resize_plan(100, 150, 128, 192, mode="pad", allow_upscale=False)
    assert (plan.content_h, plan.content_w) == (100, 150)
    out = plan.apply(frames)
    assert out.shape == (3, 128, 192, 3)
    assert torch.equal(plan.invert(out), frames)


def test_pad_plan_with_one_side_exact_needs_no_resize():
    frames = torch.rand(2, 128, 150, 3)
    plan = make_resize_plan(128, 150, 128, 192)
    assert (plan.top, plan.left, plan.content_h, plan.content_w) == (0, 21, 128, 150)
    out = plan.apply(frames)
    assert torch.equal(out[:, :, 21:171], frames)
    assert torch.equal(plan.invert(out), frames)


def test_pad_plan_fill_value_and_pad_mask():
    plan = make_resize_plan(101, 151, 128, 192, allow_upscale=False, fill=0.5)
    # padding splits as (dst - content) // 2 on the top/left, the rest on the bottom/right
    assert (plan.top, plan.left) == (13, 20)
    mask = plan.pad_mask()
    assert mask.shape == (128, 192) and mask.dtype == torch.bool
    assert int(mask.sum()) == 128 * 192 - 101 * 151
    assert not mask[13:114, 20:171].any()
    assert mask[12].all() and mask[114].all() and mask[:, 19].all() and mask[:, 171].all()
    out = plan.apply(torch.rand(2, 101, 151, 3))
    assert torch.all(out[:, mask] == 0.5)


def test_pad_plan_with_resizing_round_trip_is_close():
    frames = smooth_frames(4, 90, 160)
    plan = make_resize_plan(90, 160, 128, 192)
    assert (plan.content_h, plan.content_w) == (108, 192)
    out = plan.apply(frames)
    assert out.shape == (4, 128, 192, 3)
    assert out.min() >= 0 and out.max() <= 1
    back = plan.invert(out)
    assert back.shape == frames.shape
    assert psnr(back, frames) > 30


def test_pad_plan_upscales_to_fit_by_default():
    plan = make_resize_plan(100, 150, 128, 256)
    assert (plan.top, plan.left, plan.content_h, plan.content_w) == (0, 32, 128, 192)


def test_pad_plan_geometry_tall_source():
    plan = make_resize_plan(200, 100, 128, 192)
    assert (plan.top, plan.left, plan.content_h, plan.content_w) == (0, 64, 128, 64)
    assert int(plan.pad_mask().sum()) == 128 * 192 - 128 * 64


def test_pad_plan_geometry_wide_source():
    plan = make_resize_plan(100, 400, 128, 192)
    assert (plan.top, plan.left, plan.content_h, plan.content_w) == (40, 0, 48, 192)
    assert int(plan.pad_mask().sum()) == 128 * 192 - 48 * 192


def test_stretch_plan_fills_destination_and_inverts_closely():
    frames = smooth_frames(2, 90, 160)
    plan = make_resize_plan(90, 160, 128, 192, mode="stretch")
    assert (plan.top, plan.left, plan.content_h, plan.content_w) == (0, 0, 128, 192)
    assert not plan.pad_mask().any()
    out = plan.apply(frames)
    assert out.shape == (2, 128, 192, 3)
    assert psnr(plan.invert(out), frames) > 30


def test_identity_plan_is_bit_exact():
    frames = torch.rand(2, 64, 128, 3)
    plan = make_resize_plan(64, 128, 64, 128)
    assert torch.equal(plan.invert(plan.apply(frames)), frames)


def test_plan_rejects_wrong_frame_size():
    plan = make_resize_plan(90, 160, 128, 192)
    with pytest.raises(I2VEditError, match="expects frames of 90×160 but got 80×160"):
        plan.apply(torch.zeros(1, 80, 160, 3))
    with pytest.raises(I2VEditError, match="expects frames of 128×192 but got 90×160"):
        plan.invert(torch.zeros(1, 90, 160, 3))


def test_plan_rejects_bad_destination_and_mode():
    with pytest.raises(I2VEditError, match="use 576×1024 or 576×960"):
        make_resize_plan(100, 100, 576, 1000)
    with pytest.raises(I2VEditError, match="'pad' or 'stretch'"):
        make_resize_plan(100, 100, 128, 128, mode="crop")


def test_resize_plan_is_frozen():
    plan = make_resize_plan(100, 100, 128, 128)
    assert isinstance(plan, ResizePlan)
    with pytest.raises(AttributeError):
        plan.top = 3


# stacking and layout helpers


def test_stack_frames_accepts_both_layouts():
    a, b = torch.rand(8, 9, 3), torch.rand(1, 8, 9, 3)
    out = stack_frames([a, b])
    assert out.shape == (2, 8, 9, 3)
    assert torch.equal(out[0], a) and torch.equal(out[1], b[0])


def test_stack_frames_names_first_bad_index():
    frames = [torch.zeros(8, 9, 3), torch.zeros(1, 8, 9, 3), torch.zeros(8, 10, 3), torch.zeros(7, 9, 3)]
    with pytest.raises(I2VEditError) as info:
        stack_frames(frames)
    assert str(info.value).startswith("frame 2 ")
    assert "resize all frames to one size" in str(info.value)


def test_stack_frames_rejects_bad_rank_and_empty():
    with pytest.raises(I2VEditError, match="frame 0 has shape"):
        stack_frames([torch.zeros(2, 8, 9, 3)])
    with pytest.raises(I2VEditError, match="at least one image"):
        stack_frames([])


def test_bchw_helpers_round_trip():
    frames = torch.rand(2, 5, 7, 3)
    x = to_bchw(frames)
    assert x.shape == (2, 3, 5, 7)
    assert torch.equal(x[1, 2], frames[1, :, :, 2])
    assert torch.equal(from_bchw(x), frames)
    with pytest.raises(I2VEditError):
        to_bchw(torch.zeros(5, 7, 3))


def test_signed_helpers():
    x = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.equal(to_signed(x), torch.tensor([-1.0, -0.5, 0.0, 1.0]))
    assert torch.equal(from_signed(to_signed(x)), x)
    assert torch.equal(from_signed(torch.tensor([-3.0, 2.0])), torch.tensor([0.0, 1.0]))
