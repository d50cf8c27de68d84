"""Allocation tracking: exact byte counts for fresh storages, nothing for views, in-place or old tensors."""

import gc

import pytest
import torch

from i2vedit.run.memtrack import AllocationTracker, format_bytes, measure, track_allocations

F32 = 4


def test_exact_peak_live_and_count():
    with track_allocations() as mem:
        a = torch.empty(1000)  # 4000
        b = a * 2  # 8000 live
        assert mem.live_bytes == 8000
        del b  # 4000
        assert mem.live_bytes == 4000
        c = torch.empty(500)  # 6000
        assert mem.live_bytes == 6000
    assert mem.peak_bytes == 8000
    assert mem.live_bytes_at_exit == 6000
    assert mem.allocations == 3
    assert mem.allocated_bytes == 4000 + 4000 + 2000
    assert mem.peak_op == "aten.mul.Tensor"
    del a, c
    assert mem.live_bytes == 0  # frees after the block still register
    assert mem.live_bytes_at_exit == 6000


def test_dtype_sets_size():
    with track_allocations() as mem:
        x = torch.zeros(10, 10, dtype=torch.float16)
        y = torch.zeros(3, dtype=torch.int64)
    assert mem.peak_bytes == 200 + 24
    del x, y


def test_views_add_nothing_and_keep_their_base_alive():
    with track_allocations() as mem:
        a = torch.empty(1000)
        views = [
            a[::2],
            a.view(10, 100),
            a.view(10, 100).transpose(0, 1),
            a.reshape(20, 50),
            a.unsqueeze(0).expand(3, 1000),
            a.detach(),
            a[5:],
            *a.split(100),
            *a.view(10, 100).unbind(0),
        ]
        assert mem.live_bytes == 4000
        keep = views[0]
        del a, views
        gc.collect()
        assert mem.live_bytes == 4000  # the strided view still holds the whole storage
    assert mem.peak_bytes == 4000
    assert mem.allocations == 1
    assert mem.live_bytes_at_exit == 4000
    del keep
    assert mem.live_bytes == 0


def test_in_place_and_out_add_nothing():
    with track_allocations() as mem:
        a = torch.zeros(1000)
        b = torch.ones(1000)
        a.add_(1)
        a.mul_(b)
        a.clamp_(0, 1)
        a[:10].fill_(3.0)  # (``a[:10] = 3.0`` would allocate a real 4-byte 0-d tensor for the 3.0)
        a.copy_(b)
        torch.add(a, b, out=b)
        torch.mul(a, 2, out=a)
    assert mem.peak_bytes == 8000
    assert mem.allocations == 2
    assert torch.equal(a, torch.full((1000,), 2.0))


def test_out_that_resizes_counts_the_growth():
    with track_allocations() as mem:
        out = torch.empty(0)
        torch.add(torch.ones(100), 1, out=out)  # out grows 0 -> 400 bytes; the ones(100) temp is 400
        assert out.shape == (100,)
        assert mem.live_bytes == 400
    assert mem.peak_bytes == 800
    del out


def test_tensors_from_before_the_block_are_not_counted():
    a = torch.ones(1000)
    b = torch.ones(1000)
    with track_allocations() as mem:
        del a  # freeing old memory does not go negative
        v = b.view(10, 100)
        s = v.sum()
    assert mem.peak_bytes == F32  # only the 0-d sum
    assert mem.live_bytes_at_exit == F32
    del s, b


def test_loop_with_temporaries_has_a_peak_independent_of_iterations():
    def run(n: int) -> AllocationTracker:
        x = torch.ones(256)
        with track_allocations() as mem:
            acc = torch.zeros(256)
            for _ in range(n):
                tmp = x * 3.0  # a same-size temporary each iteration
                acc += tmp
                del tmp
        return mem

    one, many = run(1), run(50)
    assert one.peak_bytes == many.peak_bytes == 2 * 256 * F32
    assert many.allocations == 51
    assert one.live_bytes_at_exit == many.live_bytes_at_exit == 256 * F32


def test_softmax_output_is_counted():
    x = torch.randn(4, 100, 100)
    with track_allocations() as mem:
        y = torch.softmax(x, dim=-1)
    assert mem.peak_bytes == 4 * 100 * 100 * F32
    assert mem.live_bytes_at_exit == 4 * 100 * 100 * F32
    del y


def test_ops_returning_tuples_lists_and_non_tensors():
    x = torch.randn(10, 20)
    with track_allocations() as mem:
        values, indices = x.max(dim=1)  # tuple of two fresh tensors
        var, mean = torch.var_mean(x, dim=0)
        chunks = x.chunk(4, dim=0)  # list of views
        n = x.numel()  # not an op returning tensors
        size = x.size(0)
        flag = bool((x > 100).any())  # 200-byte bool temp, then a 1-byte result; both freed
    expected = 10 * (F32 + 8) + 2 * 20 * F32
    assert mem.live_bytes_at_exit == expected
    assert mem.peak_bytes == expected + 200 + 1
    assert n == 200 and size == 10 and not flag and len(chunks) == 4
    del values, indices, var, mean


def test_torch_tensor_literal_is_counted():
    with track_allocations() as mem:
        t = torch.tensor([1.0, 2.0, 3.0])
    assert mem.peak_bytes == 3 * F32
    del t


def test_meta_device_full_size_matmul_is_exact_without_allocating():
    shape = (14, 5, 9216, 9216)  # SVD at 576x1024: 14 frames x 5 heads, 9216 tokens
    a = torch.empty(shape, device="meta")
    b = torch.empty(shape, device="meta")
    with track_allocations() as mem:
        c = a @ b
    expected = 14 * 5 * 9216 * 9216 * F32
    assert expected == 23_781_703_680  # ~ 23.8 GB
    assert c.shape == shape and c.is_meta
    assert mem.peak_bytes == mem.live_bytes_at_exit == expected
    assert mem.allocations == 1  # matmul's bmm output; the reshapes around it are views
    del c
    assert mem.live_bytes == 0


def test_meta_attention_peak_holds_two_score_tensors():
    q = torch.empty(14, 5, 9216, 64, device="meta")
    with track_allocations() as mem:
        out = torch.softmax(q @ q.transpose(-1, -2), dim=-1) @ q
    scores = 14 * 5 * 9216 * 9216 * F32
    assert mem.peak_bytes == 2 * scores
    assert mem.peak_op == "aten._softmax.default"
    assert mem.live_bytes_at_exit == q.numel() * F32  # only ``out`` is left
    del out


def test_meta_storages_are_told_apart():
    with track_allocations() as mem:
        xs = [torch.empty(100, device="meta") for _ in range(5)]  # every data_ptr is 0
        assert all(x.data_ptr() == 0 for x in xs)
        assert mem.live_bytes == 5 * 400
        del xs[1:3]
        assert mem.live_bytes == 3 * 400
    assert mem.peak_bytes == 5 * 400


def test_device_filter():
    with track_allocations(device="meta") as mem:
        m = torch.empty(100, device="meta")
        c = torch.empty(100)
    assert mem.peak_bytes == 400 and mem.allocations == 1
    del m, c


def test_nested_trackers_both_count():
    with track_allocations() as outer:
        a = torch.empty(100)
        with track_allocations() as inner:
            b = torch.empty(50)
        del b
    assert inner.peak_bytes == 200 and inner.live_bytes_at_exit == 200
    assert outer.peak_bytes == 600 and outer.live_bytes_at_exit == 400
    del a


def test_autograd_saved_tensors_count_until_backward_frees_them():
    x = torch.randn(100, requires_grad=True)
    with track_allocations() as mem:
        y = x.exp()  # output is saved for backward
        loss = y.sum()
        del y
        assert mem.live_bytes == 100 * F32 + F32  # exp output kept by the graph + loss
        loss.backward()
        del loss
        gc.collect()
    assert mem.live_bytes_at_exit == 100 * F32  # x.grad, allocated during backward
    assert x.grad is not None


def test_reset_peak_and_measure():
    with track_allocations() as mem:
        a = torch.empty(1000)
        del a
        mem.reset_peak()
        b = torch.empty(10)
    assert mem.peak_bytes == 40 and mem.allocations == 2
    del b

    result, mem = measure(torch.ones, 25, dtype=torch.float64)
    assert result.shape == (25,)
    assert mem.peak_bytes == mem.live_bytes_at_exit == 200
    assert "200 B" in mem.summary()


@pytest.mark.parametrize(
    "n, text", [(0, "0 B"), (1023, "1023 B"), (1024, "1.00 KiB"), (23_781_703_680, "22.15 GiB")]
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_count_too():
    with track_allocations() as mem:
        x = torch.empty(1000, device="cuda")
        y = x * 2
        del y
    assert mem.peak_bytes == 8000 and mem.live_bytes_at_exit == 4000
    del x
