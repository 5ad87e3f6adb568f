#!/usr/bin/env python3
"""GPU check of the fused soft-gate kernel (kernels/soft_gate.py) at the paper's shape, eager and compiled:
output and gradients against the explicit soft gate (attention/soft.py) in bf16, and the forward + backward
time of each. Prints full tracebacks (bench_train.py records only the first 300 characters of a failure).

    PYTHONPATH=src python benchmarks/drivers/soft_kernel_check.py
    PYTHONPATH=src python benchmarks/drivers/soft_kernel_check.py --compare-tiles   # the fused kernel's autotuned tiles as
        # they are, then with the spill-free backward tiles added (kernels/soft_gate.py's SOFT_SPILL_FREE_TILES): errors and times
"""
import math
import sys
import time
import traceback

import torch

from gatelab.attention.attend import GateScores, attend
from gatelab.attention.backend import Backend
from gatelab.config import Routing
from gatelab.kernels.soft_gate import _TUNERS

torch.manual_seed(0)
dev = "cuda"
B, H, T, D, DG = 16, 4, 512, 64, 32


def inputs():
    return [torch.randn(B, H, T, n, device=dev, dtype=torch.bfloat16, requires_grad=True) for n in (D, D, D, DG, DG)]


def run(path, r, leaves, dout, spill_free=False):
    q, k, v, gq0, gk0 = leaves
    gq = gq0 / math.sqrt(DG)
    out = attend(q, k, v, r, gate=GateScores(lambda: gq @ gk0.transpose(-1, -2), lambda: (gq, gk0)),
                 backend=Backend(soft_attention=path, soft_spill_free_tiles=spill_free))
    out.backward(dout)
    return out


def timed(fn, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def compare_tiles():
    """Per reading: the fused kernel's error against the explicit path and its eager fwd+bwd time, with the
    default autotune lists and with the spill-free backward tiles added, side by side in this process."""
    for reading in ("sigmoid", "sigmoid-renorm", "topk-sigmoid"):
        r = Routing(mode="soft-gate", k=64, soft_mask="topk-sigmoid" if reading.startswith("topk") else "sigmoid",
                    soft_renormalize=reading.endswith("renorm"))
        leaves, dout = inputs(), torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16)
        for t in leaves:
            t.grad = None
        ref = [run("explicit", r, leaves, dout).float()] + [t.grad.float() for t in leaves]
        for spill_free in (False, True):
            for t in leaves:
                t.grad = None
            got = [run("fused", r, leaves, dout, spill_free).float()] + [t.grad.float() for t in leaves]
            err = max(float((a - b).norm() / a.norm()) for a, b in zip(ref, got))
            ms = timed(lambda: run("fused", r, leaves, dout, spill_free), n=50)
            tuners = dict(zip(("fwd", "bwd_kv", "bwd_q"), _TUNERS[spill_free]))
            chosen = {name: str(getattr(tuners[name], "best_config", "?")) for name in ("bwd_kv", "bwd_q")}
            print(f"{reading} {'spill-free tiles added' if spill_free else 'default tiles':22s}: fused fwd+bwd "
                  f"{ms:.3f} ms, largest rel. err vs explicit {err:.4f}, chosen {chosen}", flush=True)


if "--compare-tiles" in sys.argv:
    compare_tiles()
    sys.exit(0)

for reading in ("sigmoid", "sigmoid-renorm", "topk-sigmoid"):
    r = Routing(mode="soft-gate", k=64, soft_mask="topk-sigmoid" if reading.startswith("topk") else "sigmoid",
                soft_renormalize=reading.endswith("renorm"))
    leaves = inputs()
    dout = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16)
    try:
        res = {}
        for path in ("explicit", "fused"):
            for t in leaves:
                t.grad = None
            out = run(path, r, leaves, dout)
            res[path] = [out.float()] + [t.grad.float() for t in leaves]
        errs = {n: float((a - b).norm() / a.norm()) for n, a, b in
                zip(("out", "dq", "dk", "dv", "dgq", "dgk"), res["explicit"], res["fused"])}
        ms = {p: timed(lambda: run(p, r, leaves, dout)) for p in ("explicit", "fused")}
        print(f"eager {reading}: rel. err {errs}; fwd+bwd ms explicit {ms['explicit']:.3f} fused {ms['fused']:.3f}",
              flush=True)
    except Exception:  # noqa: BLE001
        print(f"eager {reading}: FAILED\n{traceback.format_exc()[-4000:]}", flush=True)
    try:
        for path in ("explicit", "fused"):
            torch._dynamo.reset()
            f = torch.compile(lambda *a: run(path, r, list(a[:5]), a[5]))
            f(*leaves, dout)
            print(f"compiled {reading} {path}: fwd+bwd ms {timed(lambda: f(*leaves, dout)):.3f}", flush=True)
    except Exception:  # noqa: BLE001
        print(f"compiled {reading}: FAILED\n{traceback.format_exc()[-6000:]}", flush=True)
