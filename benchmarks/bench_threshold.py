#!/usr/bin/env python3
"""topk-sigmoid's row threshold on the GPU (kernels/topk.py's factor_kth_largest: each row's k-th largest causal gate score,
G = gq gk^T formed in registers) under each kernel setting, at the 31M model's training shape (16 x 4 heads x 512
rows, d_gate 32, k = 64), beside the threshold from G formed in memory (the path before the factor kernel). Every
setting's threshold is checked bitwise against the kernel as first built, and against the fp32 reference.

Settings (Backend.factor_tau, GATELAB_FACTOR_TAU): rows per program; causal row segments (0: one launch over all rows; S: rows
[0, S), [S, 2S), ... each with only the keys its rows can see); coarse bits found one at a time before the exact
refinement inside the bucket (32: all 32 bits one at a time, the kernel as first built).

    PYTHONPATH=src python benchmarks/bench_threshold.py [--out benchmarks/results]
"""
import argparse
import itertools
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from gatelab.attention.masks import causal_rows
from gatelab.kernels import topk as kernels  # noqa: E402
from gatelab.kernels.topk import row_kth_largest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_topk import ms  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="folder for threshold-<gpu>.{md,json}")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--d-gate", type=int, default=32)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--rows", default="8,16,32", help="rows per program to try")
    ap.add_argument("--segments", default="0,64,128", help="first causal segments to try (0: one launch)")
    ap.add_argument("--coarse", default="32,20,16", help="coarse bits to try (32: no refinement)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_threshold.py needs a CUDA GPU")
    B, H, T, DG, k = args.batch, args.heads, args.tokens, args.d_gate, args.k
    g = torch.Generator(device="cuda").manual_seed(0)
    gq = (torch.randn(B, H, T, DG, device="cuda", generator=g) / DG ** 0.5).bfloat16()
    gk = torch.randn(B, H, T, DG, device="cuda", generator=g).bfloat16()
    want = row_kth_largest(gq.float() @ gk.float().transpose(-1, -2), k, causal_rows(T, T, "cuda"))
    finite = torch.isfinite(want)

    def rel_err(tau):  # largest relative difference from the fp32 reference, over rows with a finite threshold
        return float(((tau - want)[finite].abs() / want[finite].abs().clamp_min(1e-6)).max())

    def in_memory():
        return kernels.causal_kth_largest((gq @ gk.transpose(-1, -2)).float(), k)

    gpu = torch.cuda.get_device_name(0)
    default = kernels.FACTOR_TAU
    rows = [dict(setting="G in memory (gq gk^T, then the selection kernel)", ms=ms(in_memory), exact=None,
                 rel_err=rel_err(in_memory()))]
    first_build = kernels.factor_kth_largest(gq, gk, k, (16, 0, 32))  # the kernel as first built: every bit one at a time
    for r, seg, coarse in itertools.product(*(map(int, a.split(",")) for a in (args.rows, args.segments, args.coarse))):
        try:
            tau = kernels.factor_kth_largest(gq, gk, k, (r, seg, coarse))
            # the kernel's G (tensor-core products, fp32 accumulation) is not bitwise torch's fp32 matmul, so
            # "exact" means the first build's threshold on the same in-register scores; err is against fp32 torch
            exact = bool(torch.equal(tau, first_build))
            err = rel_err(tau)
            t = ms(lambda: kernels.factor_kth_largest(gq, gk, k, (r, seg, coarse)))
        except Exception as e:  # a setting that does not compile is a row, not the end of the run
            rows.append(dict(rows=r, segment=seg, coarse=coarse, ms=None, exact=False, error=str(e)[:200]))
            print(f"rows {r} segment {seg} coarse {coarse}: FAILED {str(e)[:200]}", flush=True)
            continue
        rows.append(dict(rows=r, segment=seg, coarse=coarse, ms=t, exact=exact, rel_err=err,
                         default=(r, seg, coarse) == default))
        print(f"rows {r:2d} segment {seg:3d} coarse {coarse:2d}: {t:.4f} ms exact {exact} rel. err {err:.1e}",
              flush=True)
    timed = [x for x in rows[1:] if x["ms"] is not None and x["exact"]]
    best = min(timed, key=lambda x: x["ms"]) if timed else None
    cmd = "python benchmarks/bench_threshold.py " + " ".join(sys.argv[1:])
    lines = [f"# topk-sigmoid's row threshold on {gpu}", "",
             f"torch {torch.__version__}; `{cmd.strip()}`; {B} x {H} heads x {T} rows, d_gate {DG}, k = {k}, bf16 "
             "factors. Mean of 20 calls after 3 warm-up calls (CUDA events). *exact*: bitwise equal in every row to "
             "the kernel as first built (16 rows, one launch, 32 bits one at a time) on the same in-register "
             "scores; *rel. err*: largest relative difference from the threshold of G formed by torch in fp32 "
             "(tensor-core products are not bitwise torch's).", "",
             "| rows / program | causal segments | coarse bits | ms | exact | rel. err | default |",
             "|---|---|---|---|---|---|---|",
             f"| {rows[0]['setting']} | | | {rows[0]['ms']:.4f} | - | {rows[0]['rel_err']:.1e} | |"]
    for x in rows[1:]:
        t = "failed" if x["ms"] is None else f"{x['ms']:.4f}"
        err = f"{x['rel_err']:.1e}" if "rel_err" in x else "-"
        lines.append(f"| {x['rows']} | {x['segment'] or 'one launch'} | {x['coarse']} | {t} | {x['exact']} | {err} | "
                     f"{'yes' if x.get('default') else ''} |")
    if best:
        lines += ["", f"Fastest exact setting: rows {best['rows']}, segments {best['segment'] or 'one launch'}, "
                  f"coarse {best['coarse']}: {best['ms']:.4f} ms."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
        (out / f"threshold-{slug}.md").write_text(text)
        (out / f"threshold-{slug}.json").write_text(json.dumps(dict(device=gpu, torch=torch.__version__, command=cmd,
                                                                    rows=rows, best=best), indent=1))


if __name__ == "__main__":
    main()
