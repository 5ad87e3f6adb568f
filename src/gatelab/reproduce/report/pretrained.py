"""The pretrained suite's report (Tables 6-9, Figure 3, the gate-variant study) from its unit results."""
from __future__ import annotations

import json
import math
from pathlib import Path

from gatelab.attention.position_gates import DEFAULT_POSITION, POSITIONS
from gatelab.config import DEFAULT_READING, write_text
from gatelab.reproduce.pretrained_protocols import PAPER, PretrainedProtocol, _reading_tag
from gatelab.tables import format_table


# -----------------------------------------------------------------------------------------------------------
def _results(out: Path) -> dict[str, dict]:
    units = out / "units"
    return {d.name: json.loads((d / "result.json").read_text())
            for d in sorted(units.glob("*")) if (d / "result.json").is_file()} if units.is_dir() else {}


def _f(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def write_pretrained_report(out: str | Path, p: PretrainedProtocol) -> Path:
    """results/pretrained/REPORT.md: each table beside the paper's Qwen3-1.7B numbers, and Figure 3."""
    out = Path(out)
    res = _results(out)
    model = next((r["model"] for r in res.values()), "?")
    device = next((r["device"] for r in res.values()), "?")
    wall = sum(r.get("wall_s", 0) for r in res.values())
    ran = lambda table, key: sorted({r["protocol"][key] for r in res.values() if r["table"] in table})  # noqa: E731
    posthoc, task = ran(("table6",), "posthoc_steps") or [p.posthoc_steps], ran(("table7", "table8"), "task_steps") \
        or [p.task_steps]
    lines = [f"# Pretrained-model experiments ({p.name} protocol): {model}", "",
             f"Regenerate: `gatelab reproduce --suite pretrained --model DIR [--gguf FILE]` (then this report is "
             f"rewritten). Device: {device}; total unit wall time {wall / 60:.1f} min. Paper: Qwen3-1.7B (28 layers), "
             f"5,000 steps; ours: post-hoc {'/'.join(map(str, posthoc))} steps, task (Tables 7-8) "
             f"{'/'.join(map(str, task))} steps, batch {p.batch_size} x "
             f"{p.context}, k = {p.k}. {p.note}", ""]
    t9 = res.get("table9")
    lines += ["## Table 9: oracle top-k vs dense", ""]
    if t9:
        ev = t9["evals"]
        rows = [dict(k=k, oracle=_f(ev.get(f"oracle-topk@k={k}")), dense=_f(ev["dense"]),
                     ratio=_f(ev.get(f"oracle-topk@k={k}", math.nan) / ev["dense"], ".4f"),
                     random=_f(ev.get(f"random-topk@k={k}")),
                     paper=f"{PAPER['table9'][k][0]} / {PAPER['table9'][k][1]}" if k in PAPER["table9"] else "-")
                for k in p.ks]
        lines += [format_table(rows, ["k", "oracle", "dense", "ratio", "random", "paper"]), ""]
    else:
        lines += ["not run", ""]
    lines += ["## Table 6: post-hoc gates, KL vs BCE (pre-RoPE gates, fixed steps; hard top-k deployment ppl / "
              "validation F1)", ""]
    rows = []
    for name, r in res.items():
        if r["table"] != "table6":
            continue
        for k in sorted(int(x) for x in r["val_f1"]):
            paper = PAPER["table6"][r["loss"]].get(k) if r["d_gate"] == p.d_gates[0] else None
            rows.append(dict(loss=r["loss"], d_gate=r["d_gate"], trained_k=r["k"], deploy_k=k,
                             ppl=_f(r["evals"][f"gate-topk@k={k}"]), f1=_f(r["val_f1"][str(k)] if str(k) in r["val_f1"]
                                                                       else r["val_f1"].get(k), ".3f"),
                             paper_ppl=_f(paper)))
    rows.sort(key=lambda r: (r["loss"] != "kl", r["d_gate"], r["trained_k"], r["deploy_k"]))
    lines += [format_table(rows, ["loss", "d_gate", "trained_k", "deploy_k", "ppl", "f1", "paper_ppl"]) if rows
              else "not run", ""]
    lines += _position_tables(res, p, t9, out)
    # the default reading first, then the others by name (a set's order varies between processes)
    readings = sorted({r.get("reading", "topk-sigmoid") for r in res.values() if r["table"] in ("table7", "table8")},
                      key=lambda x: (x != DEFAULT_READING, x)) or [DEFAULT_READING]
    for reading in readings:
        lines += _task_tables(res, p, reading, t9, out)
    notes = out / "NOTES.md"
    if notes.is_file():
        lines += [notes.read_text()]
    path = out / "REPORT.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


def _task_tables(res: dict, p: PretrainedProtocol, reading: str, t9: dict | None, out: Path) -> list[str]:
    """Tables 7 and 8 (and Figure 3) of one soft-gate reading."""
    tag = _reading_tag(reading)
    title = f" (soft-gate reading {reading})"
    lines = [f"## Table 7: one middle layer's Q/K/V/O unfrozen, soft gate on that layer{title}", ""]
    rows = [dict(condition=g, ppl=_f(res[f"table7-{g}{tag}"]["ppl"]) if f"table7-{g}{tag}" in res else "not run",
                 paper=str(PAPER["table7"][g])) for g in ("none", "learned", "random")]
    if t9:
        rows.append(dict(condition="dense, not fine-tuned", ppl=_f(t9["evals"]["dense"]),
                         paper=str(PAPER["table7"]["dense (not fine-tuned)"])))
    for r in rows:
        unit = res.get(f"table7-{r['condition']}{tag}")
        r["train_loss"] = _loss_trend(unit) if unit else "-"
        r["steps"] = _steps(unit)
    lines += [format_table(rows, ["condition", "ppl", "paper", "steps", "train_loss"]), ""]
    lines += _table7_comparison(res.get(f"table7-learned{tag}"), res.get(f"table7-random{tag}"))
    lines += [f"## Table 8 / Figure 3: n middle layers unfrozen, soft gates on all layers{title}", ""]
    rows, fig = [], []
    for n in p.unfreeze:
        a, b = res.get(f"table8-n{n}-learned{tag}"), res.get(f"table8-n{n}-random{tag}")
        pl, pr = PAPER["table8"].get(n, (None, None))
        rows.append(dict(n=n, learned=_f(a and a["ppl"]), random=_f(b and b["ppl"]),
                         gap=_f(b["ppl"] - a["ppl"]) if a and b else "-", paper=f"{pl} / {pr}" if pl else "-",
                         steps=_steps(a), learned_train_loss=_loss_trend(a), random_train_loss=_loss_trend(b),
                         train_gap_by_tenth=_paired_gap(a, b)))
        if a and b:
            fig.append((n, a["ppl"], b["ppl"]))
    lines += [format_table(rows, ["n", "learned", "random", "gap", "paper", "steps", "learned_train_loss",
                                  "random_train_loss", "train_gap_by_tenth"]), "",
              "Perplexity under the soft gate (random - learned = gap; paper: learned / random). train_loss: the LM "
              "loss averaged over the first and the last tenth of the steps; 'diverged' where it ended more than "
              "0.5 nats above its start. train_gap_by_tenth: the training loss of random minus learned (nats), "
              "averaged over each tenth of the steps; both see the same batches, so this shows whether the gap still "
              "moves at the end.", ""]
    if len(fig) >= 2:
        _plot_figure3(fig, out / f"figure3_gap_vs_unfrozen{tag}.png", f", {reading}")
        lines += [f"![Figure 3](figure3_gap_vs_unfrozen{tag}.png)", ""]
        g0, gl = fig[0][2] - fig[0][1], fig[-1][2] - fig[-1][1]
        closed = f" ({100 * (1 - gl / g0):.0f}% of it closed)" if g0 > 0 else ""
        lines += [f"Gap random - learned: {g0:.2f} ppl at n = {fig[0][0]}, {gl:.2f} at n = {fig[-1][0]}{closed}; "
                  f"paper: 31.6 -> 6.9 (78% closed).", ""]
    return lines


def _table7_comparison(learned: dict | None, random: dict | None) -> list[str]:
    """Table 7's learned vs random, against the paper's learned = random (8.80 / 8.80): flagged when they differ by
    more than 1%, with the caveat that each is one run."""
    if not learned or not random:
        return []
    rel = (random["ppl"] - learned["ppl"]) / random["ppl"]
    text = (f"Learned vs frozen random: {learned['ppl']:.2f} vs {random['ppl']:.2f} ((random - learned) / random "
            f"{100 * rel:+.1f}%; paper 8.80 / 8.80). ")
    if abs(rel) > 0.01:
        text += ("**At face value this contradicts the paper's learned = random.** One run each: whether the "
                 "difference holds across seeds is not resolvable here.")
    else:
        text += "Within 1%, as in the paper (one run each)."
    return [text, ""]


def _gap_closed(ppl: float | None, t9: dict | None, k: int) -> float | None:
    """Share of the random-to-oracle gap a gate closes at k: (random - gate) / (random - oracle), from Table 9."""
    if ppl is None or not t9:
        return None
    rand, oracle = t9["evals"].get(f"random-topk@k={k}"), t9["evals"].get(f"oracle-topk@k={k}")
    return None if rand is None or oracle is None or rand == oracle else (rand - ppl) / (rand - oracle)


POSITION_RULE = ("the variant whose KL gates deploy closest to the oracle: the lowest geometric mean of deployed "
                 "hard top-k perplexity / oracle top-k perplexity over every d_gate and k the study ran (Table 9's "
                 "oracle); ties go to the earlier of none, rope, qk (the simpler gate). Chosen only when every "
                 "variant has every unit; until then the default stays as it is.")


def position_scores(out: str | Path) -> dict[str, float]:
    """The score of POSITION_RULE per variant (geometric mean of ppl / oracle; lower is better), for the variants
    whose pos-* units all finished, read from the units' result.json files under `out`."""
    res = _results(Path(out))
    oracle = (res.get("table9") or {}).get("evals", {})
    scores: dict[str, float] = {}
    for pos in POSITIONS:
        units = [r for r in res.values() if r.get("table") == "positions" and r.get("position") == pos]
        ratios = [r["evals"][key] / oracle[f"oracle-topk@k={key.split('=')[1]}"]
                  for r in units for key in r.get("evals", {})
                  if key.startswith("gate-topk@k=") and f"oracle-topk@k={key.split('=')[1]}" in oracle]
        if units and ratios:
            scores[pos] = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
    return scores


def choose_position(out: str | Path) -> str:
    """The gate variant POSITION_RULE picks from the study under `out` (DEFAULT_POSITION while it is incomplete)."""
    res = _results(Path(out))
    counts = {pos: sum(r.get("table") == "positions" and r.get("position") == pos for r in res.values())
              for pos in POSITIONS}
    scores = position_scores(out)
    if len(scores) < len(POSITIONS) or len(set(counts.values())) != 1:
        return DEFAULT_POSITION
    return min(POSITIONS, key=lambda pos: (round(scores[pos], 6), POSITIONS.index(pos)))


def _steps_taken(r: dict) -> str:
    """'taken/cap (best B)' of a unit trained until its held-out objective stopped improving."""
    s = r.get("summary") or {}
    if s.get("max_steps") is None:
        return str(s.get("steps", "-"))
    return f"{s['steps']}/{s['max_steps']} (best {s.get('best_step')})"


def _position_tables(res: dict, p: PretrainedProtocol, t9: dict | None, out: Path) -> list[str]:
    """The gate-variant study (pos-* units), its per-layer F1, its held-out KL curves, and Table 6 of each variant
    that has table6-{variant}-* units."""
    study = {n: r for n, r in res.items() if r["table"] == "positions"}
    lines = ["## Gate variants: what the gate reads (KL gates until the held-out KL stops improving; hard top-k)", ""]
    if not study:
        return lines + ["not run", ""]
    pr = next(iter(study.values()))["protocol"]
    lines += [f"Variants (attention/position_gates.py): none = the layer input before RoPE; rope = the model's rotary embedding on "
              f"the gate's query and key; qk = low-rank maps of the model's post-RoPE q/k. Each gate trained with KL "
              f"at batch {pr['batch_size']} x {pr['context']}, held-out KL every {pr.get('eval_every')} steps on "
              f"{pr.get('eval_batches')} x {pr['batch_size']} training windows never trained on, stopped after "
              f"{pr.get('patience')} evaluations without a {100 * pr.get('min_delta', 0):.1f}% improvement "
              f"(cap {pr.get('converge_max_steps')} steps), the gates of the lowest held-out KL kept; one gate per "
              f"variant and d_gate deployed at every k. gap_closed = (random - ppl) / (random - oracle), from Table "
              f"9; F1 against the oracle top-k on the first {pr['f1_batches']} validation batches, mean over layers; "
              f"train_min: the gate's training time on the unit's device (held-out evaluations included).", ""]
    order = lambda r: (list(POSITIONS).index(r["position"]) if r["position"] in POSITIONS else 9,  # noqa: E731
                       r["d_gate"])
    rows = []
    for r in sorted(study.values(), key=order):
        for k in sorted(int(x) for x in r["val_f1"]):
            ppl = r["evals"].get(f"gate-topk@k={k}")
            ev = (t9 or {}).get("evals", {})
            gap = _gap_closed(ppl, t9, k)
            rows.append(dict(variant=r["position"], d_gate=r["d_gate"], k=k, ppl=_f(ppl),
                             oracle=_f(ev.get(f"oracle-topk@k={k}")), dense=_f(ev.get("dense")),
                             random=_f(ev.get(f"random-topk@k={k}")),
                             vs_oracle=_f(100 * (ppl / ev[f"oracle-topk@k={k}"] - 1), "+.1f") + "%"
                             if ppl and ev.get(f"oracle-topk@k={k}") else "-",
                             gap_closed="-" if gap is None else f"{100 * gap:.1f}%",
                             f1=_f(r["val_f1"].get(str(k), r["val_f1"].get(k)), ".3f"), steps=_steps_taken(r),
                             train_min=_f((r.get("summary") or {}).get("train_s", 0) / 60, ".1f")))
    lines += [format_table(rows, ["variant", "d_gate", "k", "ppl", "oracle", "dense", "random", "vs_oracle",
                                  "gap_closed", "f1", "steps", "train_min"]), ""]
    scores = position_scores(out)
    chosen = choose_position(out)
    lines += [f"The default variant, by the rule written before the study ran: {POSITION_RULE} Scores (lower is "
              f"better): " + (", ".join(f"{pos} {v:.4f}" for pos, v in scores.items()) or "none yet") + ". "
              + (f"Chosen: **{chosen}**" + ("" if chosen == DEFAULT_POSITION else
                 f" (config.DEFAULT_POSITION is still {DEFAULT_POSITION}: set it to {chosen})")
                 if len(scores) == len(POSITIONS) else f"Not every variant ran; the default stays {DEFAULT_POSITION}")
              + ".", ""]
    # per-layer F1 at the protocol's k: where each variant gains or loses
    k = p.k
    cols = [r for r in sorted(study.values(), key=order) if r.get("val_f1_layers")]
    if cols:
        layer_f1 = [(f"{r['position']} d{r['d_gate']}", r["val_f1_layers"].get(str(k), r["val_f1_layers"].get(k)))
                    for r in cols]
        layer_f1 = [(name, v) for name, v in layer_f1 if v]
        if layer_f1:
            n_layers = max(len(v) for _, v in layer_f1)
            rows = [dict(layer=i, **{name: _f(v[i], ".3f") if i < len(v) else "-" for name, v in layer_f1})
                    for i in range(n_layers)]
            lines += [f"F1 at k = {k} per layer:", "", format_table(rows, ["layer"] + [n for n, _ in layer_f1]), ""]
    curves = {f"{r['position']} d{r['d_gate']}": r["val_curve"] for r in cols if r.get("val_curve")}
    if curves:
        _plot_val_curves(curves, out / "position_gates_heldout_kl.png")
        lines += ["![held-out KL](position_gates_heldout_kl.png)", ""]
    for pos in [x for x in POSITIONS if any(r["table"] == "table6-position" and r["position"] == x
                                            for r in res.values())]:
        lines += _table6_of(res, p, pos)
    return lines


def _table6_of(res: dict, p: PretrainedProtocol, pos: str) -> list[str]:
    """Table 6 (KL vs BCE at d_gate = d_gates[0]) with gates of one variant, trained until convergence."""
    d = p.d_gates[0]
    units = [res.get(f"pos-{pos}-kl-d{d}")] + [res.get(f"table6-{pos}-bce-d{d}-k{k}") for k in p.ks]
    rows = []
    for r in units:
        if not r:
            continue
        for k in sorted(int(x) for x in r["val_f1"]):
            rows.append(dict(loss=r["loss"], d_gate=r["d_gate"], trained_k=r["k"] if r["loss"] == "bce" else "-",
                             deploy_k=k, ppl=_f(r["evals"][f"gate-topk@k={k}"]),
                             f1=_f(r["val_f1"].get(str(k), r["val_f1"].get(k)), ".3f"),
                             paper_ppl=_f(PAPER["table6"][r["loss"]].get(k)), steps=_steps_taken(r)))
    return [f"## Table 6 with {pos} gates: KL vs BCE at d_gate {d} (trained until the held-out objective stops "
            f"improving; hard top-k deployment ppl / validation F1)", "",
            format_table(rows, ["loss", "d_gate", "trained_k", "deploy_k", "ppl", "f1", "paper_ppl", "steps"])
            if rows else "not run", ""]


def _plot_val_curves(curves: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, curve in curves.items():
        ax.plot([c[0] for c in curve], [c[1] for c in curve], "o-", ms=3, label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out KL(attention || softmax(G))")
    ax.set_yscale("log")
    ax.set_title("Gate variants: held-out KL while training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def _steps(result: dict | None) -> str:
    return str(((result or {}).get("summary") or {}).get("steps", "-"))


def _tenths(losses: list[float]) -> list[float]:
    """Mean loss over each tenth of the steps (one batch's loss is noisy)."""
    w = max(1, len(losses) // 10)
    return [sum(losses[i:i + w]) / len(losses[i:i + w]) for i in range(0, len(losses) - w + 1, w)]


def _loss_trend(result: dict | None) -> str:
    """'start -> end': the mean loss over the first and the last tenth of the steps."""
    curve = (result or {}).get("curve") or []
    if not curve:
        return "-" if result is None else "not trained"
    t = _tenths([c[1] for c in curve])
    return f"{t[0]:.2f} -> {t[-1]:.2f}" + (" (diverged)" if t[-1] > t[0] + 0.5 else "")


def _paired_gap(learned: dict | None, random: dict | None) -> str:
    """Training-loss gap random - learned, tenth by tenth (both runs see the same batches in the same order, so
    the batches' difficulty cancels): whether the gap is still moving when training stops."""
    a, b = ((r or {}).get("curve") or [] for r in (learned, random))
    if not a or len(a) != len(b):
        return "-"
    t = _tenths([y[1] - x[1] for x, y in zip(a, b)])
    return " ".join(f"{v:.3f}" for v in t)


def _plot_figure3(points, path: Path, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n, learned, random = zip(*points)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(n, learned, "o-", label="learned gates")
    ax.plot(n, random, "s--", label="frozen random gates")
    ax.set_xlabel("unfrozen layers n (Q/K/V/O)")
    ax.set_ylabel("validation perplexity (soft gate)")
    if max(random + learned) / min(random + learned) > 5:  # a diverged run next to a sane one
        ax.set_yscale("log")
    ax.set_title(f"Absorption gradient (Figure 3){title}")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
