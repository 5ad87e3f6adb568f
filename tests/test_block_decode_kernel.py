"""The block-decoding kernel (kernels/block_decode.py) against its torch reference, on CPU under Triton's interpreter
(in a child process: Triton decides at import whether kernels are interpreted).

Cases: grouped-query heads (H / Hk = 1, 2, 3), rows that keep fewer blocks (-1 entries) in any place, the query's
own block cut at its position, a cache longer than the filled part, strided (non-contiguous) caches, the kept list
in one program and split over programs (then combined), float32 and bfloat16."""
import pytest

from .test_block_select import run_python

triton = pytest.importorskip("triton")


def test_block_decode_kernel_matches_the_reference_under_the_interpreter():
    out = run_python("""
        import torch
        import gatelab.kernels.block_decode as kb
        from gatelab.kernels.block_decode import block_decode, block_decode_fits, block_decode_reference
        torch.manual_seed(0)
        cases = [  # B, H, Hk, D, bs, filled, capacity, n kept, dtype, programs to aim for
            (1, 2, 2, 16, 4, 23, 23, 3, torch.float32, 1),
            (2, 4, 2, 16, 4, 23, 40, 4, torch.float32, 264),
            (1, 6, 2, 32, 8, 61, 64, 5, torch.bfloat16, 264),
            (2, 3, 1, 16, 16, 33, 48, 2, torch.float32, 1),
        ]
        for B, H, Hk, D, bs, S, cap, n, dtype, programs in cases:
            kb.TARGET_PROGRAMS = programs
            q = torch.randn(B, H, 1, D, dtype=dtype)
            kbuf = torch.randn(B, Hk, cap, D, dtype=dtype)
            vbuf = torch.randn(B, 2 * Hk, cap, D, dtype=dtype)[:, ::2]  # strided heads
            k, v = kbuf[:, :, :S], vbuf[:, :, :S]
            own = (S - 1) // bs
            idx = torch.full((B, H, n), -1, dtype=torch.int32)
            for b in range(B):
                for h in range(H):
                    earlier = torch.randperm(own)[:n - 1].sort().values if own else torch.tensor([], dtype=torch.long)
                    row = torch.cat([earlier, torch.tensor([own])]).to(torch.int32)
                    if (b + h) % 3 == 1 and row.numel() > 1:  # a row keeping one block fewer, its -1 in the middle
                        row[0] = -1
                    idx[b, h, :row.numel()] = row
            assert block_decode_fits(q, k, idx, bs)
            got = block_decode(q, k, v, idx, S - 1, bs, scale=0.3)
            ref = block_decode_reference(q.float(), k.float(), v.float(), idx, S - 1, bs, scale=0.3)
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
            torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol)
            assert got.dtype == dtype and got.shape == (B, H, 1, D)
            # the position as a tensor (read on the device: what a CUDA graph of the step replays), over the whole
            # buffer: keys past the position are never read
            pos = torch.tensor([S - 1])
            kfull, vfull = kbuf.clone(), vbuf.clone()
            kfull[:, :, S:], vfull[:, :, S:] = 1e4, 1e4
            got_t = block_decode(q, kfull, vfull, idx, pos, bs, scale=0.3)
            torch.testing.assert_close(got_t.float(), ref, rtol=tol, atol=tol)
            torch.testing.assert_close(block_decode_reference(q.float(), kfull.float(), vfull.float(), idx, pos, bs,
                                                              scale=0.3), ref)
        print("ok", len(cases))
    """)
    assert out.strip() == "ok 4"


def test_block_decode_reference_reads_only_the_kept_blocks_up_to_the_query():
    import torch

    from gatelab.kernels.block_decode import block_decode, block_decode_reference
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 20, 8), torch.randn(1, 1, 20, 8)
    idx = torch.tensor([[[1, 3], [-1, 3]]], dtype=torch.int32)  # head 1 keeps only its own block
    out = block_decode_reference(q, k, v, idx, 13, 4)
    v2 = v.clone()
    v2[:, :, [0, 1, 2, 3, 8, 9, 10, 11, 14, 15, 16, 17, 18, 19]] = 1e4  # unkept blocks and keys past the query
    assert torch.equal(block_decode_reference(q, k, v2, idx, 13, 4), out)
    ref1 = torch.nn.functional.scaled_dot_product_attention(q[:, 1:], k[:, :, 12:14], v[:, :, 12:14])
    torch.testing.assert_close(out[:, 1:], ref1)
    assert torch.equal(block_decode(q, k, v, idx, 13, 4), out)  # CPU without the interpreter: the reference


@pytest.mark.parametrize("scale_type", ["fp32", "fp64"])
def test_block_decode_kernel_builds_with_a_float64_scale(scale_type):
    """torch.compile passes a Python float to a user Triton kernel as float64; the kernel's running maxima must stay
    float32 (a float64 scale once made Triton refuse the loop). Builds the kernel's Triton IR with Triton's own front
    end for an sm90 target: no GPU needed."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    import gatelab.kernels.block_decode as kb
    fn = kb._block_decode_kernel
    pointers = dict(Q="*bf16", K="*bf16", V="*bf16", IDX="*i32", OUT="*bf16", PM="*fp32", PL="*fp32", PACC="*fp32",
                    POS="*i64")
    const = dict(BS=128, D=64, SPLIT=True, POS_IN_MEMORY=True)
    sig = {n: pointers.get(n, scale_type if n == "scale" else "constexpr" if n in const else "i32")
           for n in fn.arg_names}
    target = GPUTarget("cuda", 90, 32)
    backend = CUDABackend(target)
    options = backend.parse_options({})
    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    src = ASTSource(fn, sig, {(fn.arg_names.index(k),): v for k, v in const.items()})
    assert src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(), ctx)
