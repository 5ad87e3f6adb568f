"""Why does the `topk-sigmoid` soft gate diverge when it is learned? Per-step measurements.

Trains the compact protocol's Experiment 1 runs (the same configs as `gatelab reproduce --protocol compact`) for the
first --steps steps with TrainConfig.log_gate_stats on, for a few readings and learned / frozen random gates, and
writes, per run and per logged step: the gradient norm of the whole model and of the gates, the gate weight norms,
the spread of G (std over causal entries), the soft mask's mean, its mean slope dm/dG and its saturated share.

    python benchmarks/drivers/soft_gate_divergence.py --steps 1600 --out results/compact/divergence

Outputs: OUT/<run>.jsonl (the runs' metrics), OUT/summary.json, OUT/summary.md, OUT/divergence.png. Runs resume
(their checkpoints live under --runs); a run that stops on a non-finite loss is recorded as such.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from gatelab.config import GatelabError, soft_gate_routing, write_json, write_text
from gatelab.reproduce.suite import PROTOCOLS, Suite
from gatelab.training.train import train

RUNS = [("topk-sigmoid", "learned"), ("topk-sigmoid", "random"), ("sigmoid", "learned"),
        ("topk-sigmoid-renorm", "learned")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1600, help="train only this many steps of each run")
    ap.add_argument("--out", default="results/compact/divergence")
    ap.add_argument("--runs", default="runs/divergence", help="checkpoints (kept out of git)")
    ap.add_argument("--protocol", default="compact", choices=sorted(PROTOCOLS))
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    out, runs = Path(args.out), Path(args.runs)
    suite = Suite(PROTOCOLS[args.protocol], out / "_suite", runs, device=args.device)
    summary = {}
    for reading, gate in RUNS:
        name = f"{reading}-{gate}"
        cfg = suite.train_config(gate, soft_gate_routing(reading, suite.p.k), 0)
        cfg.log_gate_stats, cfg.log_every, cfg.eval_every = True, 10, 0
        cfg.checkpoint_every = max(100, args.steps // 4)
        status = "ok"
        try:
            train(cfg, runs / name, stop_after=args.steps)
        except GatelabError as e:  # a non-finite loss stops the run: that is a result here
            status = str(e)
        rows = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines() if line]
        rows = [r for r in rows if "gate_stats" in r and r["step"] <= args.steps]
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(runs / name / "metrics.jsonl", out / f"{name}.jsonl")
        summary[name] = dict(reading=reading, gate=gate, status=status, trajectory=[_row(r) for r in rows])
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", _markdown(summary, args))
    _plot(summary, out / "divergence.png")
    print((out / "summary.md").read_text())
    return 0


def _row(r: dict) -> dict:
    layers = r["gate_stats"]
    mean = lambda key: statistics.fmean(s[key] for s in layers if s[key] is not None)  # noqa: E731
    gate_grads = [s["gate_grad_norm"] for s in layers if s["gate_grad_norm"] is not None]
    return dict(step=r["step"], loss=r["loss"], grad_norm=r["grad_norm"],
                gate_grad_norm=(sum(g * g for g in gate_grads) ** 0.5) if gate_grads else None,
                w_norm=mean("wq_norm") * mean("wk_norm"), g_std=mean("g_std"), g_absmax=max(s["g_absmax"] for s in layers),
                mask_mean=mean("mask_mean"), slope_mean=mean("slope_mean"), saturated=mean("saturated"))


def _first(traj: list[dict], key: str, above: float):
    return next((t["step"] for t in traj if t[key] is not None and t[key] > above), None)


def _markdown(summary: dict, args) -> str:
    lines = ["# Soft-gate divergence: per-step measurements", "",
             f"`python benchmarks/drivers/soft_gate_divergence.py --steps {args.steps} --out {args.out}` (compact protocol's "
             f"Experiment 1 configs, seed 0, first {args.steps} steps). Columns are means over the 6 layers "
             "(w_norm = |W_gq| |W_gk|, Frobenius; g_std = std of G over causal entries; slope = mean m(1-m)/t; "
             "saturated = share of entries with m < 0.01 or m > 0.99).", ""]
    cols = ["step", "loss", "grad_norm", "gate_grad_norm", "w_norm", "g_std", "g_absmax", "mask_mean", "slope_mean",
            "saturated"]
    for name, s in summary.items():
        traj = s["trajectory"]
        lines += [f"## {name}", "", f"status: {s['status']}; first step with gradient norm > 1e3: "
                  f"{_first(traj, 'grad_norm', 1e3)}", ""]
        picks = [t for i, t in enumerate(traj) if i % max(1, len(traj) // 16) == 0 or i == len(traj) - 1]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join("-" if t[c] is None else f"{t[c]:.4g}" for c in cols) + " |" for t in picks]
        lines.append("")
    return "\n".join(lines)


def _plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = ["grad_norm", "gate_grad_norm", "w_norm", "g_std", "slope_mean", "saturated"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, key in zip(axes.flat, keys):
        for name, s in summary.items():
            pts = [(t["step"], t[key]) for t in s["trajectory"] if t[key] is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        if key in ("grad_norm", "gate_grad_norm", "w_norm", "g_std"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
