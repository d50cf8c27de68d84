"""The byte formulas the attention benchmark scales with, checked against method.md §6 and §8.1."""

from i2vedit.tools import bench

GIB = 2**30


def test_authors_storage_per_step_matches_the_design_notes():
    full = bench.layer_table(bench.FULL_HW, bench.FULL_CHANNELS, bench.HEAD_DIM)
    assert sorted({lay.tokens for lay in full}) == [144, 576, 2304, 9216]
    per_step = bench.capture_bytes(full, 14, 4)
    assert abs(per_step / GIB - 3.01) < 0.01  # spatial Q+K 2.71 GiB + temporal probabilities 0.30 GiB
    assert abs(bench.capture_bytes(full, 14, 4, temporal=False) / GIB - 2.71) < 0.01
    assert abs(25 * bench.kv_bytes(full, 14, 4) / GIB - 67.8) < 0.1  # one skip-interval cache
    assert abs(25 * per_step / GIB - 75.2) < 0.2


def test_our_trajectory_is_a_few_megabytes_per_clip():
    assert bench.trajectory_bytes(25, 14, bench.FULL_HW) == 26 * 14 * 4 * 72 * 128 * 4
