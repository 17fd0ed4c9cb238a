"""The GPU's launch limits (sm_80 and sm_90: 1024 threads a block, grid.y and grid.z at most 65535,
48 KiB of shared memory a block unless the kernel opts in, 163 KiB with it) on the host stand-in
(tests/host_cupy.py), which refuses a launch over one as the driver does instead of running it; and
the grouped expert kernels within them for any number of experts or GPU cache slots: more than
6144 (the shared memory the sort once took) and more than 65535 (grid.y), bit for bit
exact.expert_rows."""

import os
import sys

import numpy as np
import pytest

from lowmoe.backend import cuda, exact

from host_cupy import SHARED, SHARED_OPTIN, CUDADriverError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import kernel_inputs  # noqa: E402  (tools/, for its weights in every dtype)


def _norm(kernels, grid=(1,), block=(256,), shared_mem=0):
    """rms_norm_f32 (32 floats of static shared memory) over one row of 64, launched as given ->
    the row it wrote, NaN where it did not."""
    x, out = np.ones((1, 64), np.float32), np.full((1, 64), np.nan, np.float32)
    kernels.function("rms_norm_f32")(grid, block, (x, np.ones(64, np.float32), out, np.int32(64), np.float32(1e-6)),
                                     shared_mem=shared_mem)
    return out


@pytest.mark.parametrize("grid,block,what", [
    ((1,), (1025,), "block"), ((1,), (32, 33), "block"), ((1,), (1, 1, 65), "block"),
    ((1, 65536), (256,), "grid"), ((1, 1, 65536), (256,), "grid"), ((2**31,), (256,), "grid"), ((0,), (256,), "grid")])
def test_a_launch_over_a_grid_or_block_limit_is_refused(kernels, grid, block, what):
    with pytest.raises(CUDADriverError, match=f"CUDA_ERROR_INVALID_VALUE.*rms_norm_f32: {what}"):
        _norm(kernels, grid, block)


def test_shared_memory_over_48_kib_needs_the_opt_in(kernels):
    """Static and dynamic shared memory count together: rms_norm_f32's 128 static bytes leave
    48 KiB - 128 of dynamic; more is refused (and nothing runs) until max_dynamic_shared_size_bytes
    opts in, which is refused itself above 163 KiB in all."""
    assert kernels.function("rms_norm_f32").static_shared == 128
    assert np.isfinite(_norm(kernels, shared_mem=SHARED - 128)).all()
    with pytest.raises(CUDADriverError, match="dynamic shared memory"):
        _norm(kernels, shared_mem=SHARED - 127)
    f = kernels.function("router_topk_f32")  # 4 E bytes of dynamic shared memory: E 12289 is 48 KiB + 4
    E, k = 12289, 2
    logits = np.zeros((1, E), np.float32)
    logits[0, [7, E - 1]] = 1.0
    idx, w = np.full((1, k), -1, np.int32), np.full((1, k), np.nan, np.float32)
    args = (logits, np.int32(E), np.int32(k), np.int32(1), idx, w)
    with pytest.raises(CUDADriverError, match="dynamic shared memory"):
        f((1,), (32,), args, shared_mem=4 * E)
    assert (idx == -1).all()
    with pytest.raises(CUDADriverError, match="max_dynamic_shared_size_bytes"):
        f.max_dynamic_shared_size_bytes = SHARED_OPTIN + 1
    f.max_dynamic_shared_size_bytes = 4 * E
    f((1,), (32,), args, shared_mem=4 * E)
    assert idx.tolist() == [[7, E - 1]] and w.tolist() == [[0.5, 0.5]]


def _grouped_rows(dtype, E, idx, I=8, D=16):
    """cuda.expert_rows over E stacked experts (or slots) for the T = len(idx) tokens routed to
    idx int32[T, k] (grouped: T > 1) against exact.expert_rows per row, bit for bit."""
    T, k = idx.shape
    g = np.random.default_rng([E, T, k])
    x = (g.standard_normal((T, D)) * 3).astype(np.float32)
    gate, up = (kernel_inputs.weights(g, (E, I, D), dtype, 1 / np.sqrt(D))[0] for _ in range(2))
    down = kernel_inputs.weights(g, (E, D, I), dtype, 1 / np.sqrt(I))[0]
    want = np.full((T, k, D), np.nan, np.float32)
    for t in range(T):
        for j, e in enumerate(idx[t]):
            exact.expert_rows(x[t : t + 1], gate[e], up[e], down[e], dtype, want[t, j : j + 1])
    got = np.full((T * k, D), np.nan, np.float32)
    cuda.expert_rows(x, gate, up, down, dtype, idx, got)
    assert np.array_equal(got.reshape(T, k, D).view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_grouped_experts_over_6144_slots(host_gpu, dtype):
    """7000 slots (Qwen3-30B-A3B's 6144 experts all cached, plus staging): the sort's shared memory
    no longer grows with them. Groups of one and two tokens, the first and last slots."""
    _grouped_rows(dtype, 7000, np.array([[6999, 3], [6999, 6998], [0, 6144]], np.int32))


def test_grouped_experts_over_65535_slots(host_gpu):
    """More groups than grid.y has blocks: block y also computes group y + 65535."""
    E = 65537
    _grouped_rows("bf16", E, np.array([[E - 1, 1], [E - 2, E - 1], [65534, 0]], np.int32), D=8)
