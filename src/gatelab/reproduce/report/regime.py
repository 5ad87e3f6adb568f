"""The regime study's section of a reproduction report: the cost of a frozen random soft gate against dense in each
cell of the grid (regime.py), the hypotheses' predictions beside what was measured, a plot, and its verdict."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from gatelab.plots import pyplot, save_figure
from gatelab.reproduce import regime
from gatelab.reproduce.report.verdicts import Verdict, evaluation, num

PREFIX = {"dense": "dense", "soft-sigmoid": "soft-gate", "soft-sigmoid-renorm": "soft-gate",
          "random-topk": "random-topk"}


def measure(R: dict, protocol_name: str) -> dict:
    """cell name -> {condition: (perplexity, cost against the cell's dense run)}; None where a unit did not run;
    conditions a cell does not train are absent."""
    table = {}
    for cell in regime.grid(protocol_name):
        dense = evaluation(R.get(regime.unit_name(cell, "dense")), "dense")
        row = {}
        for condition in cell.conditions:
            ppl = evaluation(R.get(regime.unit_name(cell, condition)), PREFIX[condition])
            row[condition] = (ppl, None if ppl is None or dense is None else ppl / dense - 1)
        row.setdefault("dense", (dense, 0.0 if dense is not None else None))
        table[cell.name] = row
    return table


def _cost(table: dict, cell: str, condition: str = "soft-sigmoid"):
    return (table.get(cell, {}).get(condition) or (None, None))[1]


def seed_noise(R: dict, seeds: int) -> float | None:
    """The standard deviation over seeds of the frozen random soft gate's cost against dense (Experiment 1's random
    gates and the dense runs of the same seeds): how far one seed's cost wanders. None with fewer than 2 seeds."""
    costs = []
    for s in range(seeds):
        r = evaluation(R.get(f"exp1-sigmoid-random-s{s}"), "soft-gate")
        d = evaluation(R.get("dense" + (f"-s{s}" if s else "")), "dense")
        if r is None or d is None:
            break
        costs.append(r / d - 1)
    return statistics.stdev(costs) if len(costs) > 1 else None


def _order(values: list, increasing: bool, threshold: float | None) -> str | None:
    """Each step of `values` (costs of single-seed cells) in the predicted direction by more than `threshold`:
    'supported'; any step the other way by more than it: 'contradicted'; otherwise 'not resolvable'. None if a
    value is missing."""
    if any(v is None for v in values) or threshold is None:
        return None if any(v is None for v in values) else "not resolvable (no seed-noise estimate)"
    steps = [(b - a) if increasing else (a - b) for a, b in zip(values, values[1:])]
    if all(d > threshold for d in steps):
        return "supported"
    return "contradicted" if any(d < -threshold for d in steps) else "not resolvable"


def outcomes(table: dict, threshold: float | None) -> dict:
    """Each hypothesis of regime.PREDICTIONS judged by the order of the measured costs it predicts; a difference
    between two cells counts only beyond `threshold` (two cells of one seed each)."""
    soft = [c for row in table.values() for cond, (_, c) in row.items() if cond in regime.SOFT_CONDITIONS]
    ran = [c for c in soft if c is not None]
    renorm = [(_cost(table, cell, "soft-sigmoid-renorm"), _cost(table, cell)) for cell in ("base", "scale3", "scale10")]
    renorm = [(r, s) for r, s in renorm if None not in (r, s)]
    return {
        "H0 absorption everywhere": None if not ran else "supported" if max(ran) < 0.10 else "contradicted",
        "H1 data per parameter": _order([_cost(table, c) for c in ("data16", "data4", "base")], True, threshold)
        or _order([_cost(table, c) for c in ("data16", "base")], True, threshold),
        "H2 training length": _order([_cost(table, c) for c in ("steps4k", "base")], False, threshold),
        "H3 saturation": _order([_cost(table, c) for c in ("base", "scale3", "scale10")], True, threshold)
        or _order([_cost(table, c) for c in ("base", "scale10")], True, threshold),
        "H4 reading": None if not renorm else _order_pairs(renorm, threshold),
        "H5 model size": _order([_cost(table, c) for c in ("base", "small")], True, threshold),
    }


def _order_pairs(pairs: list, threshold: float | None) -> str:
    """H4: renorm (first) no costlier than sigmoid (second) at every scale."""
    if threshold is None:
        return "not resolvable (no seed-noise estimate)"
    if any(r - s > threshold for r, s in pairs):
        return "contradicted"
    return "supported" if all(s - r > threshold for r, s in pairs) else "not resolvable"


def _pct(c) -> str:
    return "-" if c is None else f"{100 * c:+.1f}%"


def _plot(table: dict, path: Path, memorised: list) -> bool:
    cells = [c for c, row in table.items() if any(v[1] is not None for k, v in row.items() if k != "dense")]
    if not cells:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    conditions = ("soft-sigmoid", "soft-sigmoid-renorm", "random-topk")
    for i, condition in enumerate(conditions):
        xs = [j + (i - 1) * 0.27 for j in range(len(cells))]
        ys = [100 * (_cost(table, c, condition) or 0) for c in cells]
        label = "hard random top-k (fixed)" if condition == "random-topk" else \
            f"frozen random soft gate, {condition.removeprefix('soft-')}"
        ax.bar(xs, ys, width=0.27, label=label)
    ax.axhline(34, color="k", ls="--", lw=1, label="paper: frozen random soft gate, +34%")
    ax.axhline(10, color="grey", ls=":", lw=1, label="a cell binds at +10%")
    ax.set_xticks(range(len(cells)), [c + ("\n(memorised)" if c in memorised else "") for c in cells])
    ax.set_ylabel("cost against the cell's dense run (%)")
    ax.set_title("What a frozen random mask costs, trained end to end (seed 0; absent bar = not run)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path)
    return True


def _memorised(table: dict, vocab: int) -> list[str]:
    """Cells whose dense run scores worse than a uniform guess over the vocabulary: the model memorised its
    training share, and its validation perplexity says nothing about routing."""
    return [c for c, row in table.items() if row["dense"][0] is not None and row["dense"][0] > vocab]


def _rows(cells, table: dict, memorised: list) -> list[str]:
    lines = ["| cell | factor | setting | dense | frozen random soft gate (`sigmoid`) | (`sigmoid-renorm`) | "
             "hard random top-k trained |", "|---|---|---|---|---|---|---|"]
    for cell in cells:
        row = table[cell.name]

        def show(condition):
            if condition not in row:
                return "-"
            ppl, cost = row[condition]
            return "not run" if ppl is None else f"{ppl:.2f} ({_pct(cost)})"
        flag = " (memorised: worse than a uniform guess)" if cell.name in memorised else ""
        lines.append(f"| {cell.name} | {cell.factor} | {cell.level} | {num(row['dense'][0])}{flag} | "
                     f"{show('soft-sigmoid')} | {show('soft-sigmoid-renorm')} | {show('random-topk')} |")
    return lines


def section(R: dict, protocol, out: Path) -> tuple[list[str], Verdict | None]:
    cells = regime.grid(protocol.name)
    if not cells:
        return [], None
    table = measure(R, protocol.name)
    vocab = (protocol.model or {}).get("vocab_size", 50257)
    memorised = _memorised(table, vocab)
    noise = seed_noise(R, protocol.seeds)
    threshold = None if noise is None else 1.96 * math.sqrt(2) * noise
    lines = ["", "## The regime study: when does a frozen random soft gate cost what the paper reports?", "",
             regime.__doc__.split("\n\n")[1].replace("\n", " "), ""] + _rows(cells, table, memorised)
    lines += ["", "Cost = perplexity / the cell's dense perplexity - 1 (validation, whole split). Scale cells share the "
                  "base cell's dense run; the base cell's soft runs are Experiment 1's frozen random gates at seed 0. "
                  "One seed per cell. How far one seed's cost wanders: "
                  + (f"{100 * noise:.1f}% (standard deviation of the frozen random soft gate's cost against dense over "
                     f"Experiment 1's {protocol.seeds} seeds, each against the dense run of its seed); the outcome column "
                     f"below counts a difference between two cells only beyond {100 * threshold:.1f}% (1.96 x sqrt 2 "
                     f"x that)."
                     if noise is not None else "unknown (fewer than 2 seeds of Experiment 1 and dense)."), "",
              "Predictions, written before the runs (`regime.PREDICTIONS`), and what the measured costs say (the "
              "outcome column's rule, `report_regime.outcomes`, was written after the runs):", "",
              "| hypothesis | mechanism | predicts | outcome |", "|---|---|---|---|"]
    judged = outcomes(table, threshold)
    lines += [f"| {h} | {why} | {pred} | {judged.get(h) or 'not run'} |" for h, why, pred in regime.PREDICTIONS]
    if _plot(table, out / "regime_costs.png", memorised):
        lines += ["", "![regime study](regime_costs.png)"]
    facts = dict(cells={c.name: max((v[1] for k, v in table[c.name].items() if k in regime.SOFT_CONDITIONS
                                     and v[1] is not None), default=None) for c in cells})
    binding = [c for c, v in facts["cells"].items() if v is not None and v >= 0.10]
    ran = [c for c, v in facts["cells"].items() if v is not None]
    measured = (f"the frozen random soft gate's largest cost against dense in the {len(ran)} cell(s) run: " +
                ", ".join(f"{c} {_pct(facts['cells'][c])}" for c in ran) +
                (f"; at or above +10%: {', '.join(binding)}" if binding else "; none at +10% (paper +34%)"))
    if memorised:
        measured += (f"; memorised cells (dense worse than a uniform guess over {vocab:,} tokens, so their costs are "
                     f"ratios of meaningless perplexities): {', '.join(memorised)}")
    lines += _power_lines(binding, memorised)
    units = [regime.unit_name(c, k) for c in cells for k in c.conditions]
    return lines, Verdict("regime", "Regime study (beyond the paper)", facts, measured, units)


def _power_lines(binding: list, memorised: list) -> list[str]:
    """Experiment 1 with power: where it stands (criteria.CRITERIA["exp1-power"])."""
    lines = ["", "### Experiment 1 with power", ""]
    if not binding:
        return lines + ["No cell binds, so there is no regime here in which Experiment 1 could detect absorption: in "
                        "every regime tried, end-to-end training absorbed even a random soft gate."]
    sane = [c for c in binding if c not in memorised]
    if not sane:
        return lines + [f"The only binding cells ({', '.join(binding)}) are memorised: Experiment 1 there would "
                        f"compare perplexities worse than a uniform guess, which cannot say anything about routing. "
                        f"Not run. Outside them, end-to-end training absorbed even a random soft gate in every "
                        f"regime tried."]
    return lines + [f"Binding cells where Experiment 1 has power: {', '.join(sane)}. Not run yet: learned vs frozen "
                    f"random soft gate and dense at 3 seeds there, judged by criteria.CRITERIA['exp1-power']."]
