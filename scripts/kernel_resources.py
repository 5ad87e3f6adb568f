#!/usr/bin/env python3
"""Compile every gatelab Triton kernel for an NVIDIA target without a GPU, and report what each config uses.

    python scripts/kernel_resources.py [--arch 90] [--out benchmarks/results/kernel-resources-sm90.md]

Triton compiles to a cubin here on the CPU (its wheel bundles ptxas and cuobjdump), so a kernel that fails to
compile for the H100, or a tile config that spills registers to local memory (STACK bytes a thread), shows up
before any device time is spent. It checks compilation and resources only, not speed or results: the CPU tests run
the kernels under Triton's interpreter, and speed needs the GPU (benchmarks/). The Triton here may be newer than the
GPU's (3.9 here, 3.6 with torch 2.11), so a config that compiles here is a lead, not a guarantee.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def compile_report(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs)
    try:
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=num_warps, num_stages=num_stages))
    except Exception as e:  # noqa: BLE001 - a compile failure is the finding
        return dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        Path(path).write_bytes(k.asm["cubin"])
        out = subprocess.run([str(cuobjdump), "-res-usage", path], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    wgmma = "warp_group_dot" in k.asm.get("ttgir", "")
    return dict(regs=int(m[1]) if m else None, stack=int(m[2]) if m else None, shared=k.metadata.shared,
                wgmma=wgmma)


def kernel_grid(long_context: bool = True):
    """(kernel, shape note, signature, constexprs, warps, stages) for each config gatelab launches on the GPU, at the
    paper's GPT shapes (T = 512, head dim 64, d_gate 32, d_model 256) and SmolLM2's block shapes (block 128): training
    and inference kernels alike. long_context: also the block selection at 128K tokens (1024 blocks a row)."""
    from gatelab.kernels import block_decode, block_factors, block_mass, block_select, head_loss, soft_gate
    from gatelab.kernels import topk as topk_kernels
    bf16, f32 = "*bf16", "*fp32"
    rows = []
    topk = dict(scores_ptr=f32, row_hash_ptr="*i64", keep_ptr="*i8", tau_ptr=f32, n_rows="i32", T="i32", S="i32",
                offset="i32", k="i32")
    for hashed, keep, tau, note in ((False, True, False, "keep-mask"), (True, True, False, "hashed keep-mask"),
                                    (False, False, True, "threshold")):
        rows.append((topk_kernels._topk_rows_kernel, f"{note}, 8 rows x 512", topk,
                     dict(HASHED=hashed, WRITE_KEEP=keep, WRITE_TAU=tau, BLOCK_M=8, BLOCK_N=512), 4, 3))
    for coarse in (32, 16):
        rows.append((topk_kernels._factor_tau_kernel, f"16 rows x 512, d_gate 32, {coarse} coarse bits",
                     dict(GQ=bf16, GK=bf16, TAU=f32, T="i32", k="i32", row0="i32", row1="i32"),
                     dict(DG=32, BLOCK_M=16, BLOCK_N=512, COARSE=coarse), 8, 3))
    soft = dict(Q=bf16, K=bf16, V=bf16, GQ=bf16, GK=bf16, TAU=f32)
    for cfg in soft_gate._soft_configs(tuple(sorted(set(sum(soft_gate.SOFT_SPILL_FREE_TILES.values(), ()))))):
        m, n, w, st = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages
        common = dict(sm_scale=0.125, inv_t=1.0, RENORM=False, HAS_TAU=True, D=64, DG=32, BLOCK_M=m, BLOCK_N=n)
        rows.append((soft_gate._soft_fwd_kernel, f"{m} x {n}", {**soft, "O": bf16, "L": f32, "T": "i32"}, common, w, st))
        rows.append((soft_gate._soft_bwd_kv_kernel, f"{m} x {n}", {**soft, "DO": bf16, "L": f32, "DELTA": f32, "DK": bf16,
                                                           "DV": bf16, "DGK": bf16, "T": "i32"}, common, w, st))
        rows.append((soft_gate._soft_bwd_q_kernel, f"{m} x {n}", {**soft, "DO": bf16, "L": f32, "DELTA": f32, "DQ": bf16,
                                                          "DGQ": bf16, "T": "i32"}, common, w, st))
    rows.append((block_mass._block_mass_kernel, "block 128, tile 64, head dim 64",
                 dict(Q=bf16, K=bf16, OUT=f32, sqb="i32", sqh="i32", sqt="i32", skb="i32", skh="i32", skt="i32",
                      H="i32", T="i32", nb="i32", group="i32", qk_scale="fp32"),
                 dict(BLOCK=128, TILE_N=64, D=64), 8, 3))
    factors = dict(SQ=bf16, SK=bf16, WQ=f32, WK=f32, GQ=bf16, GK=bf16, **{n: "i32" for n in (
        "H", "nb", "C", "DG", "q_group", "k_group", "block_size")}, q_scale="fp32", **{n: "i32" for n in (
        "sq_b", "sq_h", "sq_t", "sq_c", "sk_b", "sk_h", "sk_t", "sk_c", "wq_h", "wq_c", "wq_d", "wk_h", "wk_c", "wk_d")})
    for maxmin in (False, True):
        rows.append((block_factors._block_factors_kernel, f"block 128, head dim 64, d_gate 32, max-min keys {maxmin}",
                     factors, dict(K_MAXMIN=maxmin, BLOCK_T=block_factors.TOKEN_TILE,
                                   BLOCK_C=block_factors.FEATURE_TILE, BLOCK_D=32), 4, 3))
    i32p = "*i32"
    select = dict(GQ=bf16, GK=bf16, KV_NUM=i32p, KV_IDX=i32p, FULL_NUM=i32p, FULL_IDX=i32p, H="i32", nb="i32",
                  kk="i32", DG="i32", **{n: "i32" for n in ("sqb", "sqh", "sqn", "sqd", "skb", "skh", "skn", "skd")})
    rows_per_program, coarse = block_select.SELECT_TILE
    for nb, note in ((256, "32K tokens"), (1024, "128K tokens"))[:2 if long_context else 1]:
        rows.append((block_select._block_select_kernel, f"{rows_per_program} query blocks x {nb} ({note}), d_gate 32",
                     select, dict(UPCAST=False, DC=32, BLOCK_M=rows_per_program, BLOCK_N=nb, COARSE=coarse),
                     4 if nb <= 256 else 8, 1))
    decode = dict(Q=bf16, K=bf16, V=bf16, IDX=i32p, OUT=bf16, PM=f32, PL=f32, PACC=f32, H="i32", G="i32", n="i32",
                  per_split="i32", POS="i32", scale="fp32", **{n: "i32" for n in (
                      "sqb", "sqh", "sqd", "skb", "skh", "sks", "skd", "svb", "svh", "svs", "svd", "sob", "soh",
                      "sod")})
    for split, in_memory in ((True, True), (False, False)):
        sig = {**decode, "POS": i32p} if in_memory else decode
        rows.append((block_decode._block_decode_kernel, f"block 128, head dim 64, split {split}, position on the "
                     f"device {in_memory}", sig, dict(BS=128, D=64, SPLIT=split, POS_IN_MEMORY=in_memory), 4, 3))
    rows.append((block_decode._combine_kernel, "16 shares, head dim 64",
                 dict(PM=f32, PL=f32, PACC=f32, OUT=bf16, H="i32", splits="i32", sob="i32", soh="i32", sod="i32"),
                 dict(D=64, NS=16), 4, 3))
    lse = dict(H=bf16, W=bf16, TGT="*i64", MAX=f32, SUM=f32, PICK=f32, N="i32", V="i32", cols_per_split="i32")
    for m, v, w, st in head_loss.LCE_LSE_TILES:
        rows.append((head_loss._lce_lse_kernel, f"{m} x {v}, C 256", lse, dict(C=256, BLOCK_M=m, BLOCK_V=v), w, st))
    grad = dict(H=bf16, W=bf16, TGT="*i64", LSE=f32, G=bf16, DH=f32, N="i32", V="i32", g_stride="i32",
                cols_per_split="i32")
    for m, v, w, st in head_loss.LCE_GRAD_TILES:
        rows.append((head_loss._lce_grad_kernel, f"{m} x {v}, C 256", grad,
                     dict(C=256, BLOCK_M=m, BLOCK_V=v, WRITE_G=True, WANT_DH=True), w, st))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200)")
    ap.add_argument("--out", help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    try:
        import triton
    except ImportError:
        sys.exit("kernel_resources: Triton is not installed (pip install triton)")
    lines = [f"# gatelab's Triton kernels compiled for sm_{args.arch} (no GPU)", "",
             f"Triton {triton.__version__}; `python scripts/kernel_resources.py --arch {args.arch}`. *stack*: bytes "
             "of local memory a thread (register spills); *wgmma*: Hopper warp-group matrix instructions used.", "",
             "| kernel | config | warps | stages | registers | stack | shared bytes | wgmma |",
             "|---|---|---|---|---|---|---|---|"]
    failed = 0
    for fn, note, sig, cx, w, st in kernel_grid():
        r = compile_report(fn, sig, cx, w, st, args.arch)
        name = fn.fn.__name__ if hasattr(fn, "fn") else fn.__name__
        if "error" in r:
            failed += 1
            lines.append(f"| {name} | {note} | {w} | {st} | FAILED: {r['error']} | | | |")
        else:
            lines.append(f"| {name} | {note} | {w} | {st} | {r['regs']} | {r['stack']} | {r['shared']} | "
                         f"{'yes' if r['wgmma'] else 'no'} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
