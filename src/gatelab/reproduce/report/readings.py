"""The soft-gate reading study: which of the four readings of the paper's soft gate gatelab uses by default.

The paper says only "element-wise multiplication with sigmoid gate scores (no hard top-k)"; gatelab reads that four
ways (config.READINGS; docs/method.md). Each reading is scored against facts the paper states about soft gating
(READING_FACTS); the default is the reading that satisfies the most (a fact not measured counts as not
satisfied), ties going to the reading listed first in config.READINGS (closest to the paper's words: no top-k
threshold, then no renormalisation). When it was written: commit 30a55e4, 2026-11-25, after the 4,000-step
results of every reading had been committed (results/compact-4k) and before the 10,000-step study ran.
"""
from __future__ import annotations

from gatelab.config import DEFAULT_READING, READINGS
from gatelab.reproduce.report.verdicts import evaluation as _eval
from gatelab.reproduce.report.verdicts import num as _f

READING_FACTS = [
    ("exp1-absorption", "Exp. 1: the learned soft gate ends within 5% of the frozen random one",
     "48.73 vs 49.83 (2.2%)",
     lambda s: None if None in (s["exp1_learned"], s["exp1_random"])
     else abs(s["exp1_random"] - s["exp1_learned"]) / s["exp1_random"] < 0.05),
    ("exp1-stable", "Exp. 1: the learned soft-gate run trains without diverging (gradient norm below 1e3)",
     "converges (48.73 +- 0.60)", lambda s: None if s["exp1_learned_max_grad"] is None
     else s["exp1_learned_max_grad"] <= 1e3),
    ("exp1-cost", "Exp. 1: soft gating costs perplexity: the frozen random soft gate is at least 5% worse than dense",
     "49.83 vs 37.32 (+34%)", lambda s: None if None in (s["exp1_random"], s["dense"])
     else s["exp1_random"] >= 1.05 * s["dense"]),
    ("table5-learned", "Table 5: gate-only task training on the frozen dense model ends within 1% of dense",
     "37.29 vs 37.32", lambda s: None if None in (s["table5_learned"], s["dense"])
     else abs(s["table5_learned"] - s["dense"]) / s["dense"] <= 0.01),
    ("table5-fast", "Table 5: ... and is within 1% of dense by step 500", "37.33 at step 500",
     lambda s: None if None in (s["table5_learned_step500"], s["dense"])
     else abs(s["table5_learned_step500"] - s["dense"]) / s["dense"] <= 0.01),
    ("table5-random", "Table 5: the frozen random gate on the frozen dense model is at least 10% worse than dense",
     "46.86 vs 37.32 (+26%)", lambda s: None if None in (s["table5_random"], s["dense"])
     else s["table5_random"] >= 1.10 * s["dense"]),
    ("exp3-contrast", "Exp. 3: a BCE gate deployed with hard top-k on the co-adapted checkpoint is at least 2x worse "
     "than on the dense one", "601.6 vs 48.6 (12.4x)", lambda s: None if None in (s["exp3_coadapted"], s["exp3_dense"])
     else s["exp3_coadapted"] >= 2 * s["exp3_dense"]),
]


def _at_step(curve, step: int):
    """A validation curve's value at `step`, or at its last evaluation before it (short protocols such as smoke)."""
    points = [(s, v) for s, v in (curve or []) if s <= step]
    return max(points)[1] if points else None


def reading_study(R: dict) -> dict:
    """Per reading: its measurements (seed 0), each fact's outcome (True / False / None = not measured), its score,
    and which reading the written rule chooses ("chosen"; None until every study unit has finished)."""
    dense = _eval(R.get("dense"), "dense")
    exp3_dense = _eval(R.get("exp3-bce-on-dense"), "gate-topk")
    readings, complete = {}, True
    for reading in READINGS:
        learned, random_ = R.get(f"exp1-{reading}-learned-s0"), R.get(f"exp1-{reading}-random-s0")
        t5l, t5r = R.get(f"table5-{reading}-learned-s0"), R.get(f"table5-{reading}-random-s0")
        e3 = R.get(f"exp3-bce-on-exp1-{reading}-learned-s0")
        complete &= all(x is not None for x in (learned, random_, t5l, t5r, e3))
        m = dict(dense=dense, exp3_dense=exp3_dense, exp1_learned=_eval(learned, "soft-gate"),
                 exp1_random=_eval(random_, "soft-gate"),
                 exp1_learned_max_grad=learned.get("max_grad_norm") if learned else None,
                 table5_learned=_eval(t5l, "soft-gate"), table5_random=_eval(t5r, "soft-gate"),
                 table5_learned_step500=_at_step(t5l.get("curve") if t5l else None, 500),
                 exp3_coadapted=_eval(e3, "gate-topk"))
        facts = {key: test(m) for key, _, _, test in READING_FACTS}
        readings[reading] = dict(measured=m, facts=facts, score=sum(v is True for v in facts.values()))
    complete &= dense is not None and exp3_dense is not None
    best = max(readings.values(), key=lambda r: r["score"])["score"]
    chosen = next(r for r in READINGS if readings[r]["score"] == best) if complete else None
    return dict(readings=readings, chosen=chosen, complete=complete)


def reading_study_section(study: dict) -> list[str]:
    names = list(READINGS)
    mark = {True: "yes", False: "no", None: "not run"}
    lines = ["## The soft-gate reading study (seed 0 each)", "",
             "The paper says only \"element-wise multiplication with sigmoid gate scores (no hard top-k)\"; gatelab "
             "reads that four ways (`routing.soft_mask` sigmoid / topk-sigmoid, `routing.soft_renormalize` false / "
             "true; docs/method.md). **The rule** (`reproduce/report/readings.py`, `READING_FACTS`): each reading is scored against the "
             "facts the paper states about soft gating below; the default is the reading that satisfies the most "
             "(a fact not measured counts as not satisfied); ties go to the reading closest to the paper's words "
             "(this order: " + ", ".join(names) + "). **When it was written:** commit 30a55e4 (2026-11-25), after the "
             "4,000-step results of every reading had been committed (`results/compact-4k/`), before this 10,000-step "
             "study ran. Of the seven facts, the only one that separates `sigmoid` from `sigmoid-renorm` is Exp. 3's "
             "contrast itself (under `sigmoid-renorm` it is small; see Experiment 3); the tie-break order also picks "
             "`sigmoid`.", "",
             "| fact (paper) | " + " | ".join(f"`{r}`" for r in names) + " |", "|---|" + "---|" * len(names)]
    for key, text, paper, _ in READING_FACTS:
        lines.append(f"| {text} ({paper}) | " + " | ".join(
            mark[study["readings"][r]["facts"][key]] for r in names) + " |")
    lines.append("| **facts satisfied** | " + " | ".join(
        f"**{study['readings'][r]['score']} / {len(READING_FACTS)}**" for r in names) + " |")
    lines += ["", "| measured | " + " | ".join(f"`{r}`" for r in names) + " |", "|---|" + "---|" * len(names)]
    for key, label in (("exp1_learned", "Exp. 1 learned"), ("exp1_random", "Exp. 1 frozen random"),
                       ("exp1_learned_max_grad", "Exp. 1 learned: max gradient norm"),
                       ("table5_learned", "Table 5 learned"), ("table5_learned_step500", "Table 5 learned at step 500"),
                       ("table5_random", "Table 5 frozen random"),
                       ("exp3_coadapted", "Exp. 3 BCE gate on the co-adapted checkpoint")):
        vals = [study["readings"][r]["measured"][key] for r in names]
        lines.append(f"| {label} | " + " | ".join(_f(v, 1 if key.endswith("max_grad") else 2) for v in vals) + " |")
    m0 = study["readings"][names[0]]["measured"]
    lines += ["", f"Dense: {_f(m0['dense'])}; Exp. 3 BCE gate on the dense checkpoint: {_f(m0['exp3_dense'])}.", ""]
    if study["chosen"] is None:
        lines.append(f"The study is not complete yet; the default stays `{DEFAULT_READING}`.")
    elif study["chosen"] == DEFAULT_READING:
        lines.append(f"**The rule chooses `{study['chosen']}`, which is gatelab's default** (`config.DEFAULT_READING`);"
                     f" the headline tables below use it. Every reading stays available (`--reading`, "
                     f"`routing.soft_mask`, `routing.soft_renormalize`).")
    else:
        lines.append(f"**WARNING: the rule chooses `{study['chosen']}`, but gatelab's default is `{DEFAULT_READING}`**: "
                     f"update `config.DEFAULT_READING`.")
    return lines
