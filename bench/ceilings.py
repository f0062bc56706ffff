"""The GPU's measured ceilings, taken in the same run as the benchmark that divides by them.

PERF.md's numbers are one H100's; the lent machine may be another card (an H200 moves ~1.4x the bytes), so
every "% of floor/roofline" is against what this card does now: a device-to-device copy (bytes read +
written) and a bf16 8192^3 matmul on random data, each the median of CUDA-event timings after warm-up.
"""
import functools

import torch


@functools.cache
def measure():
    """{'copy_bw_Bps', 'matmul_flops', 'device'} of the current CUDA device (measured once per process)."""
    import triton.testing
    n = 1 << 29                                    # 1 GiB of bf16 each way: far beyond the L2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    copy_bw = 2 * src.numel() * src.element_size() / (ms * 1e-3)
    del src, dst
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    matmul = 2 * 8192 ** 3 / (ms * 1e-3)
    del a, b
    torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name(0), "copy_bw_Bps": copy_bw, "matmul_flops": matmul}
