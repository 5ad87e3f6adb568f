"""The block factors kernel's error on a GPU, split into the float32 sums' reordering and the final bfloat16 rounding.

For the shapes of tests/test_cuda.py::test_block_factors_kernel_at_prefill_shapes (a qk gate over 8 x 8K, 9 query
heads on 3 key heads; an X gate over 1 x 32K, 576 features; mean and max-min keys), prints per factor:
  - bf16: the elements where kernel and torch reference differ by more than one bfloat16 rounding of the reference,
    with the largest such difference and where it is;
  - float32: the largest difference between the kernel and the reference on the same inputs in float32 (no final
    rounding), and the factor's largest magnitude, the scale the reordering error is measured against.

    PYTHONPATH=src python benchmarks/drivers/block_factors_accuracy.py     # needs a CUDA GPU
"""
from __future__ import annotations

import torch

from gatelab.kernels.block_factors import block_factors, block_factors_reference


def inputs(B, HQ, HK, T, C, pool, dtype, g):
    q = torch.randn(B, T, HQ, C, device="cuda", generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(B, HK, T, C, device="cuda", generator=g).to(dtype)
    wq = torch.randn(9, C, 32, device="cuda", generator=g) / C ** 0.5
    wk = torch.randn(9, C * (2 if pool == "max-min" else 1), 32, device="cuda", generator=g) / C ** 0.5
    return q, k, wq.bfloat16().float(), wk.bfloat16().float()


def main() -> None:
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for pool in ("mean", "max-min"):
        g = torch.Generator(device="cuda").manual_seed(0)  # one stream per pooling over both shapes, as the test
        for shape in ((8, 9, 3, 8192, 64), (1, 1, 1, 32768, 576)):
            q, k, wq, wk = inputs(*shape, pool, torch.bfloat16, g)
            got, want = block_factors(q, k, wq, wk, 128, pool), block_factors_reference(q, k, wq, wk, 128, pool)
            got32 = block_factors(q.float(), k.float(), wq, wk, 128, pool)
            want32 = block_factors_reference(q.float(), k.float(), wq, wk, 128, pool)
            for side, a, b, a32, b32 in zip("qk", got, want, got32, want32):
                ulp = 2.0 ** (torch.floor(torch.log2(b.float().abs().clamp_min(2 ** -100))) - 7)
                diff = (a.float() - b.float()).abs()
                bad = diff > ulp
                print(f"{pool:7s} {shape} g{side}: bf16 {int(bad.sum())} of {bad.numel()} beyond one rounding"
                      + (f" (largest {float(diff[bad].max()):.3g} at {bad.nonzero()[0].tolist()}, reference "
                         f"{float(b[bad].float().abs().min()):.3g} at its smallest)" if bad.any() else "")
                      + f"; float32 max |kernel - reference| {float((a32 - b32).abs().max()):.3g}, "
                        f"largest |factor| {float(b32.abs().max()):.3g}")


if __name__ == "__main__":
    main()
