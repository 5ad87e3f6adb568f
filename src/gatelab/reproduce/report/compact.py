"""REPORT.md for a reproduction: our numbers beside the paper's, plots, and one verdict per line of evidence.

Reads only `<out>/units/*/result.json` (and the metrics copied beside them), so the report can be rebuilt
anywhere with `gatelab report --out results/<protocol>`. Every verdict is judged by its rules in criteria.py,
quoted with the commit that wrote them; every multi-seed comparison is paired by seed (stats.py).
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from gatelab.config import DEFAULT_READING, GatelabError, write_text
from gatelab.plots import pyplot, save_figure
from gatelab.reproduce.report import block as report_block
from gatelab.reproduce.report import regime as report_regime
from gatelab.reproduce.report.readings import READING_FACTS, reading_study, reading_study_section  # noqa: F401 (public)
from gatelab.reproduce.report.stats import of_differences
from gatelab.reproduce.report.verdicts import (
    Verdict, criteria_section, diverged, evaluation, load_results, mean_std, ms, num, seeds_of
)
from gatelab.tables import format_table  # noqa: F401 (public)

PAPER = {
    "dense": 37.32,
    "exp1": dict(learned=(48.73, 0.60), random=(49.83, 0.04)),
    "exp2": dict(learned=71.22, random=71.24),
    "exp3": dict(dense=(0.842, 48.6), soft=(0.804, 601.6)),
    "exp4": dict(dense=78.19, masks=(104.43, 0.66)),
    "table4": {64: (0.833, 48.83, 46.00), 128: (0.888, 40.24, 39.5), 256: (0.931, 37.57, 37.5)},
    "table5": dict(learned=(37.29, 0.00), random=(46.86, 0.10), learned_step500=37.33),
    "fig1": dict(top64_all=0.906, layer2=1.00, layer3=0.998, entropy=0.497),
}


def _plot_curves(series: dict[str, list], path: Path, title: str, ylabel: str = "validation perplexity") -> bool:
    series = {k: v for k, v in series.items() if v}
    if not series:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, marker="." if len(pts) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    return True


def _pct(v, digits: int = 1) -> str:
    return "-" if v is None else f"{100 * v:+.{digits}f}%"


def _exp1(R: dict, protocol, dense, out: Path) -> tuple[list[str], Verdict | None]:
    reading = DEFAULT_READING
    learned = seeds_of(R, lambda s: f"exp1-{reading}-learned-s{s}", protocol.seeds)
    random_ = seeds_of(R, lambda s: f"exp1-{reading}-random-s{s}", protocol.seeds)
    n = min(len(learned), len(random_))
    lv = [evaluation(r, "soft-gate") for r in learned[:n]]
    rv = [evaluation(r, "soft-gate") for r in random_[:n]]
    L, Rd = mean_std(lv), mean_std(rv)
    rel = of_differences([(r - l) / r for l, r in zip(lv, rv)])
    lines = ["", f"## Experiment 1 (Table 1): end-to-end soft gate, learned vs frozen random (reading `{reading}`)",
             "", "| condition | ours | paper |", "|---|---|---|",
             f"| learned soft gate ({n} seeds) | {ms(L)} | 48.73 +- 0.60 |",
             f"| frozen random soft gate ({n} seeds) | {ms(Rd)} | 49.83 +- 0.04 |", f"| dense baseline | {num(dense)} | 37.32 |"]
    verdict = None
    if L and Rd and dense:
        cost = Rd[0] / dense - 1
        lines += [f"| (random - learned) / random, paired over seeds | {rel.describe(100, '%', 1)} | +2.2% |",
                  f"| cost of the frozen random soft gate against dense | {_pct(cost)} | +33.5% |"]
        unstable = sorted(r["name"] for r in learned + random_ if diverged(r))
        facts = dict(L=L[0], R=Rd[0], dense=dense, rel=rel, cost=cost, diverged=bool(unstable))
        measured = (f"reading `{reading}`: learned {L[0]:.2f} vs frozen random {Rd[0]:.2f} (dense {dense:.2f}); "
                    f"(random - learned) / random {rel.describe(100, '%', 1)} (paper +2.2%); the frozen random soft "
                    f"gate costs {_pct(cost)} against dense (paper +34%), so in this regime there is little routing "
                    f"benefit for a learned gate to miss (the regime study below asks where there is)")
        if unstable:
            measured += f"; diverged (gradient norm above 1e3): {', '.join(unstable)}"
        verdict = Verdict("exp1", "1. Learned gates match random gates (Exp. 1)", facts, measured,
                          [r["name"] for r in learned + random_] + ["dense"])
    curves = {name: R[name].get("curve") for name in R if name.startswith(f"exp1-{reading}-") or name == "dense"}
    if _plot_curves(curves, out / "exp1_validation_curves.png", "Experiment 1: validation perplexity"):
        lines += ["", "![Experiment 1 validation curves](exp1_validation_curves.png)"]
    return lines, verdict


def _exp2(R: dict) -> tuple[list[str], Verdict | None]:
    hl, hr = evaluation(R.get("exp2-hard-learned"), "gate-topk"), evaluation(R.get("exp2-hard-random"), "gate-topk")
    grad = None
    if "exp2-gradient-check" in R:
        grad = next((g for g in R["exp2-gradient-check"]["gate_gradients"] if g["routing"] == "gate-topk"), None)
    unchanged = R.get("exp2-hard-learned", {}).get("gate_params_unchanged_from_init")
    lines = ["", "## Experiment 2: end-to-end hard top-k gate", "", "| condition | ours | paper |", "|---|---|---|",
             f"| learned gate | {num(hl)} | 71.22 |", f"| frozen random gate | {num(hr)} | 71.24 |",
             f"| gate gradient norm under hard top-k | {'not run' if grad is None else grad['gate_grad_norm']} "
             f"(exactly zero: {None if grad is None else grad['exactly_zero']}) | 0 |",
             f"| learned gate's weights after training == its initialisation | {unchanged} | - |"]
    if not (hl and hr and grad):
        return lines, None
    return lines, Verdict("exp2", "2. Hard top-k gets zero gradient (Exp. 2)",
                          dict(exactly_zero=grad["exactly_zero"], hl=hl, hr=hr),
                          f"gate gradient exactly {grad['gate_grad_norm']}; learned {hl:.2f} vs random {hr:.2f} (one "
                          f"seed: with a zero gradient the two runs differ only in their gates' frozen values)",
                          ["exp2-hard-learned", "exp2-hard-random", "exp2-gradient-check"])


def _exp3_pairs(R: dict, protocol) -> list[tuple]:
    """(seed, dense-side BCE unit, co-adapted-side BCE unit, co-adapted source unit) for every seed with both."""
    pairs = []
    for s in range(protocol.seeds):
        source = f"exp1-{DEFAULT_READING}-learned-s{s}"
        on_dense = R.get("exp3-bce-on-dense" + (f"-s{s}" if s else ""))
        on_soft = R.get(f"exp3-bce-on-{source}")
        if on_dense and on_soft:
            pairs.append((s, on_dense, on_soft, R.get(source)))
    return pairs


def _exp3(R: dict, protocol) -> tuple[list[str], Verdict | None]:
    pairs = _exp3_pairs(R, protocol)
    lines = ["", "## Experiment 3 (Table 2): BCE gate on a frozen checkpoint, deployed with hard top-k", "",
             f"Per seed s: a BCE gate distilled on the dense checkpoint of seed s and on the soft-gated checkpoint of "
             f"seed s (Experiment 1's learned gate, reading `{DEFAULT_READING}`), each deployed with hard top-"
             f"{protocol.k}.", "",
             "| seed | F1 on dense | ppl on dense | F1 on soft-gated | ppl on soft-gated | ratio |", "|---|---|---|---|---|---|"]
    ratios = []
    for s, d, c, _ in pairs:
        pd_, pc = evaluation(d, "gate-topk"), evaluation(c, "gate-topk")
        ratios.append(pc / pd_)
        lines.append(f"| {s} | {num(d['val_f1'], 3)} | {pd_:.2f} | {num(c['val_f1'], 3)} | {pc:.2f} | {pc / pd_:.1f}x |")
    lines.append("| paper | 0.842 | 48.6 | 0.804 | 601.6 | 12.4x |")
    renorm = R.get("exp3-bce-on-exp1-sigmoid-renorm-learned-s0")
    if renorm and pairs and pairs[0][0] == 0:
        pr = evaluation(renorm, "gate-topk") / evaluation(pairs[0][1], "gate-topk")
        lines += ["", f"Under the `sigmoid-renorm` reading (seed 0) the contrast nearly vanishes: {pr:.2f}x."]
    if not pairs:
        return lines, None
    log_ratio = of_differences([math.log(r) for r in ratios])
    geo = math.exp(log_ratio.mean)
    interval = "" if log_ratio.lo is None else (f", 95% CI [{math.exp(log_ratio.lo):.1f}x, {math.exp(log_ratio.hi):.1f}x]"
                                                f"; smallest detectable change of the ratio: a factor of "
                                                f"{math.exp(log_ratio.detectable):.2f}")
    lines += ["", f"Geometric mean ratio over {len(ratios)} paired seed(s): {geo:.1f}x{interval}."]
    sources_diverged = [p[3]["name"] for p in pairs if p[3] and diverged(p[3])]
    measured = ("co-adapted / dense deployment perplexity per seed " + ", ".join(f"{r:.1f}x" for r in ratios) +
                f" (geometric mean {geo:.1f}x{interval}; paper 12.4x)")
    if renorm and pairs[0][0] == 0:
        measured += (f"; under `sigmoid-renorm` (seed 0) only "
                     f"{evaluation(renorm, 'gate-topk') / evaluation(pairs[0][1], 'gate-topk'):.2f}x")
    if sources_diverged:
        measured += f"; the co-adapted source diverged in {', '.join(sources_diverged)}"
    facts = dict(ratio=statistics.fmean(ratios), log_ratio=log_ratio, source_diverged=bool(sources_diverged))
    units = [u["name"] for _, d, c, _ in pairs for u in (d, c)]
    return lines, Verdict("exp3", "3. Distillation contrast (Exp. 3)", facts, measured, units)


def _exp4(R: dict, protocol) -> tuple[list[str], Verdict | None]:
    rows = []
    for s in range(protocol.seeds):
        st, dn = R.get("exp4-stochastic" + (f"-s{s}" if s else "")), R.get("dense" + (f"-s{s}" if s else ""))
        if st and dn:
            masks = [v for key, v in st["evals"].items() if key.startswith("random-topk")]
            rows.append((s, st, evaluation(st, "dense"), evaluation(dn, "dense"), masks))
    lines = ["", "## Experiment 4 (Table 3): stochastic (Gumbel) mask training", "",
             "Per seed s: the stochastically trained model of seed s, deployed dense and with fixed random masks, "
             "against the dense baseline of seed s.", "",
             "| seed | deployed dense | fixed random masks | dense baseline | ratio (deployed dense / baseline) |",
             "|---|---|---|---|---|"]
    for s, _, sd, dn, masks in rows:
        lines.append(f"| {s} | {sd:.2f} | {ms(mean_std(masks))} ({len(masks)} masks) | {dn:.2f} | {sd / dn:.3f}x |")
    lines.append("| paper | 78.19 | 104.43 +- 0.66 (5 masks) | 37.32 | 2.10x |")
    if not rows:
        return lines, None
    ratios = of_differences([sd / dn for _, _, sd, dn, _ in rows])
    lines += ["", f"Mean ratio over {ratios.n} paired seed(s): {ratios.describe(1, 'x', 3).replace('+', '')}."]
    measured = (f"the stochastically trained model deployed dense against the dense baseline of its seed: mean ratio "
                f"{ratios.describe(1, 'x', 3).replace('+', '')} (paper 2.10x)")
    units = [r[1]["name"] for r in rows] + ["dense" + (f"-s{s}" if s else "") for s, *_ in rows]
    return lines, Verdict("exp4", "4. Stochastic masking does not help (Exp. 4)",
                          dict(ratio=ratios.mean, ratios=ratios), measured, units)


def _table4(R: dict, protocol, dense) -> tuple[list[str], Verdict | None]:
    lines = ["", "## Table 4: KL-distilled gates on the frozen dense checkpoint, hard top-k deployment", "",
             "| k | gate F1 | gate ppl | oracle ppl | random ppl | gap closed | paper F1 / gate / oracle |",
             "|---|---|---|---|---|---|---|"]
    verdict = None
    for kk in protocol.topk_ks:
        r = R.get(f"table4-kl-{kk}")
        g = evaluation(r, "gate-topk")
        o = evaluation(R.get("dense"), f"oracle-topk@k={kk}")
        rnd = evaluation(R.get("dense"), f"random-topk@k={kk}")
        closed = (rnd - g) / (rnd - o) if g and o and rnd and rnd != o else None
        paper = PAPER["table4"].get(kk)
        if kk == protocol.k and closed is not None:
            verdict = Verdict("table4", "5. Post-hoc gates are near-oracle (Table 4)", dict(closed=closed),
                              f"the KL gate at k = {kk} deploys at {g:.2f} against oracle {o:.2f} and random "
                              f"{rnd:.2f}, closing {100 * closed:.1f}% of the random-to-oracle gap (paper about 94%; "
                              f"one distillation)", [f"table4-kl-{kk}", "dense"])
        lines.append(f"| {kk} | {num(r and r['val_f1'], 3)} | {num(g)} | {num(o)} | {num(rnd)} | "
                     f"{num(None if closed is None else 100 * closed, 1)}{'%' if closed is not None else ''} | "
                     f"{'%.3f / %.2f / %.2f' % paper if paper else '-'} |")
    lines += ["", f"Dense: {num(dense)} (paper 37.32). Gap closed = (random - gate) / (random - oracle)."]
    return lines, verdict


def _table5(R: dict, protocol, dense, out: Path) -> tuple[list[str], Verdict | None]:
    reading = DEFAULT_READING
    learned = seeds_of(R, lambda s: f"table5-{reading}-learned-s{s}", protocol.seeds)
    random_ = seeds_of(R, lambda s: f"table5-{reading}-random-s{s}", protocol.seeds)
    tl = [evaluation(r, "soft-gate") for r in learned]
    tr = [evaluation(r, "soft-gate") for r in random_]
    TL, TR = mean_std(tl), mean_std(tr)
    step500 = [v for v in (dict(r["curve"]).get(500) for r in learned if r["curve"]) if v]
    lines = ["", f"## Table 5 and Figure 2a: gate-only task training on the frozen dense model (reading `{reading}`)",
             "", "| condition | ours | paper |", "|---|---|---|",
             f"| learned gates ({len(tl)} seeds) | {ms(TL)} | 37.29 +- 0.00 |",
             f"| frozen random gates ({len(tr)} seeds) | {ms(TR)} | 46.86 +- 0.10 |",
             f"| learned, at step 500 | {ms(mean_std(step500))} | 37.33 |", f"| dense baseline | {num(dense)} | 37.32 |"]
    verdict = None
    if TL and TR and dense:
        lrel = of_differences([v / dense - 1 for v in tl])
        rrel = of_differences([v / dense - 1 for v in tr])
        lines += [f"| learned / dense - 1 over gate seeds (one dense checkpoint) | {lrel.describe(100, '%', 2)} | -0.1% |",
                  f"| frozen random / dense - 1 | {rrel.describe(100, '%', 1)} | +25.6% |"]
        facts = dict(L=TL[0], R=TR[0], dense=dense, learned_rel=lrel, random_rel=rrel)
        measured = (f"reading `{reading}`: learned {TL[0]:.2f} vs dense {dense:.2f} ({lrel.describe(100, '%', 2)}), "
                    f"frozen random {TR[0]:.2f} ({rrel.describe(100, '%', 1)}) (paper 37.29 / 46.86 / 37.32)")
        verdict = Verdict("table5", "6. Gate-only training reaches dense, a random gate does not (Table 5)", facts,
                          measured, [r["name"] for r in learned + random_] + ["dense"])
    series = {r["name"].replace(f"table5-{reading}-", ""): r["curve"] for r in learned}
    for r in random_:
        steps = [s for s, _ in next(iter(series.values()), [])] or [0, protocol.task_steps]
        series[r["name"].replace(f"table5-{reading}-", "") + " (frozen)"] = [
            (s, evaluation(r, "soft-gate")) for s in (steps[0], steps[-1])]
    if _plot_curves(series, out / "figure2a_gate_only.png", "Gate-only task training (frozen dense model)"):
        lines += ["", "![Figure 2a](figure2a_gate_only.png)"]
    return lines, verdict


def _figure1(R: dict, protocol) -> list[str]:
    f1 = R.get("fig1-concentration")
    lines = ["", "## Figure 1: attention concentration of the dense model", ""]
    if not f1:
        return lines + ["not run"]
    kk = protocol.topk_ks[0]
    lines += [f"| layer | top-{kk} mass | entropy ratio |", "|---|---|---|"]
    lines += [f"| {r['layer']} | {100 * r[f'top{kk}_mass']:.1f}% | {r['entropy_ratio']:.3f} |" for r in f1["layers"]]
    return lines + ["", "Paper (k=64 of 512): 90.6% over all layers (layer 2: 100%, layer 3: 99.8%); entropy ratio "
                        "0.497. Top-k mass is averaged over query rows with more than k causal keys.", "",
                    "![Figure 1](units/fig1-concentration/concentration.png)"]


def _header(protocol) -> list[str]:
    return [f"# gatelab reproduction: protocol `{protocol.name}`", "", f"{protocol.note}", "",
            f"Corpus `{protocol.corpus}`; model {protocol.model or 'the paper default (6 x 256, 4 heads, ctx 512)'}; "
            f"{protocol.steps:,} steps at batch {protocol.batch_size} for every end-to-end run; k = {protocol.k}; "
            f"{protocol.seeds} seed(s); KL/BCE gates {protocol.distill_steps:,} steps; gate-only task training "
            f"{protocol.task_steps:,} steps. Perplexity: token-weighted over "
            f"{'the whole validation split' if not protocol.eval_tokens else f'the first {protocol.eval_tokens:,} validation tokens'}"
            f" in non-overlapping chunks. The paper's numbers are for its 31M model on WikiText-103 after 50,000 "
            f"steps, so absolute perplexities are not comparable; the comparisons *within* each table are. A "
            f"multi-seed comparison pairs the runs of each seed and gives the mean difference, its 95% t-interval and "
            f"the smallest effect the design detects (80% power, alpha 0.05); a verdict whose effect is below that "
            f"says \"not resolvable\".", "",
            f"Regenerate: `gatelab reproduce --protocol {protocol.name}` (finished units are skipped), or only this "
            f"report from the committed per-unit JSON: `gatelab report --protocol {protocol.name}`.", ""]


def _summary(R: dict, units: list[str], verdicts: list[Verdict]) -> list[str]:
    gpu_s = sum(r["wall_s"] for r in R.values() if r.get("device", "cpu") != "cpu")
    cpu_s = sum(r["wall_s"] for r in R.values() if r.get("device", "cpu") == "cpu")
    devices = sorted({r.get("device", "?") for r in R.values()})
    head = ["## Verdicts: the four lines of evidence, the post-hoc results, and beyond the paper", ""]
    head += [v.line(R) for v in verdicts] or ["- no experiment has finished yet."]
    return head + ["", f"Units finished: {len(R)} of {len(units)}. Sum of their wall times: "
                       f"{gpu_s / 60:.1f} GPU minutes{f', {cpu_s / 60:.1f} CPU minutes' if cpu_s else ''} on "
                       f"{', '.join(devices)} (units run side by side with `--jobs-per-gpu` overlap, so the device "
                       f"time can be lower).", ""]


def _check_protocol(R: dict, protocol, out: Path) -> None:
    """Refuse to write a protocol's report over units trained under other settings (an archive of an earlier
    protocol, say), which would put this protocol's header above them."""
    cfg = (R.get("dense") or {}).get("config")
    if cfg and cfg.get("steps") != protocol.steps:
        raise GatelabError(f"{out} holds units trained for {cfg['steps']:,} steps, not the {protocol.name} protocol's "
                           f"{protocol.steps:,}: it is not this protocol's reproduction (an archive of an earlier one?); "
                           f"nothing written")


def write_report(out: str | Path, protocol, units: list[str]) -> Path:
    """REPORT.md of a protocol's reproduction from the unit results under `out`; units: the suite's unit names."""
    out = Path(out)
    R = load_results(out)
    _check_protocol(R, protocol, out)
    dense = evaluation(R.get("dense"), "dense")
    lines = _header(protocol) + reading_study_section(reading_study(R))
    verdicts = []
    for section_lines, verdict in (_exp1(R, protocol, dense, out), _exp2(R), _exp3(R, protocol), _exp4(R, protocol),
                                   _table4(R, protocol, dense), _table5(R, protocol, dense, out)):
        lines += section_lines
        verdicts += [verdict] if verdict else []
    lines += _figure1(R, protocol)
    for section_lines, verdict in (report_block.section(R, protocol), report_regime.section(R, protocol, out)):
        lines += section_lines
        verdicts += [verdict] if verdict else []
    lines += [""] + criteria_section(verdicts, R)
    notes = out / "NOTES.md"  # hand-written interpretation of the measured numbers, kept beside the report
    if notes.is_file():
        lines += ["", "## Notes (hand-written, from the numbers above)", "", notes.read_text().strip()]
    first_section = next(i for i, line in enumerate(lines) if line.startswith("## "))
    text = "\n".join(lines[:first_section] + _summary(R, units, verdicts) + lines[first_section:]) + "\n"
    write_text(out / "REPORT.md", text)
    return out / "REPORT.md"
