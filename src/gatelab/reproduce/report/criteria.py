"""Every verdict's criterion, with its history: the one place a reproduction report's rules live.

A verdict's rules are kept in the order they were written; the last is the one in force. A rule is never edited
in place: a change is a new rule appended below the old one, with the date and commit that wrote it and what had
already been measured then (`seen`). The report quotes the rule in force with its commit, and for a verdict whose
rule changed it shows the verdict under the first-written rule beside the current one, and says "criterion revised
after results" when the change came after one of the verdict's units had finished (by the units' `finished_at`)
or after results of the same experiment existed (`seen`).

Judges take the facts the report measured (a dict; see each verdict's `facts` line) and return a status:
"reproduced", "partly", "not reproduced", "not resolvable with N seeds", or None when a fact is missing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

REPRODUCED, PARTLY, NOT_REPRODUCED = "reproduced", "partly", "not reproduced"


def unresolvable(n: int) -> str:
    return f"not resolvable with {n} seed{'s' if n != 1 else ''}"


@dataclass(frozen=True)
class Rule:
    text: str  # the rule, in words, as the report quotes it
    written: str  # when it was written: ISO 8601 UTC of the commit that wrote it
    commit: str  # that commit (short hash)
    judge: Callable[[dict], str | None]
    seen: str = ""  # results of this experiment that existed when the rule was written ("" = none)


def _need(f: dict, *keys) -> bool:
    return all(f.get(k) is not None for k in keys)


# ---- Experiment 1: facts L, R (mean perplexity of the learned / frozen random soft gate), dense, diverged (a learned
# run's gradient norm above 1e3), rel (stats.Paired of (random - learned) / random over seeds), cost (R / dense - 1)
def _exp1_v1(f):
    if not _need(f, "L", "R", "dense") or f["R"] == f["dense"]:
        return None
    return REPRODUCED if (f["R"] - f["L"]) / (f["R"] - f["dense"]) < 0.25 else NOT_REPRODUCED


def _exp1_v2(f):
    if not _need(f, "L", "R"):
        return None
    return REPRODUCED if abs(f["R"] - f["L"]) / f["R"] < 0.05 and not f.get("diverged") else NOT_REPRODUCED


def _exp1_v3(f):
    if not _need(f, "L", "R", "dense"):
        return None
    absorbed = abs(f["R"] - f["L"]) / f["R"] < 0.05 and not f.get("diverged")
    return REPRODUCED if absorbed and f["R"] >= 1.05 * f["dense"] else PARTLY if absorbed else NOT_REPRODUCED


def _equivalence(rel, bound: float, diverged: bool):
    """Within +-bound: the whole 95% interval inside; not: the whole interval outside; else not resolvable."""
    if rel is None:
        return None
    if diverged:
        return NOT_REPRODUCED
    if rel.within(-bound, bound):
        return REPRODUCED
    if rel.outside(-bound, bound):
        return NOT_REPRODUCED
    return unresolvable(rel.n)


def _exp1_v4(f):
    if not _need(f, "rel", "cost"):
        return None
    if f["cost"] < 0.10:
        return unresolvable(f["rel"].n) + " (a frozen random soft gate costs under 10% against dense: nothing to absorb)"
    return _equivalence(f["rel"], 0.05, f.get("diverged"))


# ---- Experiment 2: exactly_zero (the gate's gradient under hard top-k), hl, hr (learned / random perplexity)
def _exp2_v1(f):
    if not _need(f, "exactly_zero", "hl", "hr"):
        return None
    return REPRODUCED if f["exactly_zero"] and abs(f["hl"] - f["hr"]) / f["hr"] < 1e-3 else NOT_REPRODUCED


# ---- Experiment 3: ratio (co-adapted / dense deploy perplexity, seed 0), source_diverged, log_ratio (stats.Paired of
# log(co-adapted / dense) over seeds, each seed's pair of checkpoints trained at that seed)
def _exp3_v1(f):
    return None if not _need(f, "ratio") else REPRODUCED if f["ratio"] >= 2 else NOT_REPRODUCED


def _exp3_v2(f):
    status = _exp3_v1(f)
    return PARTLY if status == REPRODUCED and f.get("source_diverged") else status


def _exp3_v3(f):
    lr = f.get("log_ratio")
    if lr is None or lr.lo is None:
        return None if lr is None else unresolvable(lr.n)
    if f.get("source_diverged"):
        return PARTLY if lr.lo >= math.log(2) else NOT_REPRODUCED
    return REPRODUCED if lr.lo >= math.log(2) else NOT_REPRODUCED if lr.hi < math.log(2) else unresolvable(lr.n)


# ---- Experiment 4: ratio (stochastically trained model deployed dense / the dense baseline, seed 0), ratios
# (stats.Paired of that ratio over seeds, each against the dense baseline of the same seed)
def _exp4_v1(f):
    return None if not _need(f, "ratio") else REPRODUCED if f["ratio"] >= 1.25 else NOT_REPRODUCED


def _exp4_v2(f):
    if not _need(f, "ratio"):
        return None
    return REPRODUCED if f["ratio"] >= 1.25 else PARTLY if f["ratio"] >= 1.05 else NOT_REPRODUCED


def _exp4_v3(f):
    r = f.get("ratios")
    if r is None or r.lo is None:
        return None if r is None else unresolvable(r.n)
    return REPRODUCED if r.lo >= 1.25 else NOT_REPRODUCED if r.hi < 1.25 else unresolvable(r.n)


# ---- Table 4: closed (share of the random-to-oracle gap the KL gate closes at the protocol's k)
def _table4_v1(f):
    return None if not _need(f, "closed") else REPRODUCED if f["closed"] >= 0.9 else NOT_REPRODUCED


# ---- Table 5: L, R (mean learned / frozen random gate-only perplexity), dense; learned_rel, random_rel (stats.Paired
# of L_i / dense - 1 and R_i / dense - 1 over the gate seeds; one dense checkpoint)
def _table5_v1(f):
    if not _need(f, "L", "R", "dense"):
        return None
    reaches, worse = abs(f["L"] - f["dense"]) / f["dense"] <= 0.01, f["R"] >= 1.10 * f["dense"]
    return REPRODUCED if reaches and worse else PARTLY if reaches or worse else NOT_REPRODUCED


def _table5_v2(f):
    lr, rr = f.get("learned_rel"), f.get("random_rel")
    if lr is None or rr is None:
        return None
    if lr.lo is None or rr.lo is None:
        return unresolvable(min(lr.n, rr.n))
    reaches, worse = lr.within(-0.01, 0.01), rr.lo >= 0.10
    if reaches and worse:
        return REPRODUCED
    if lr.outside(-0.01, 0.01) and rr.hi < 0.10:
        return NOT_REPRODUCED
    return PARTLY if reaches or worse else unresolvable(min(lr.n, rr.n))


# ---- Block routing (beyond the paper): L, R (mean learned / frozen random soft block gate), diverged, rel (stats.Paired
# of (random - learned) / random over seeds). "reproduced" reads "absorbed" here.
def _block_v1(f):
    if not _need(f, "L", "R"):
        return None
    return REPRODUCED if abs(f["R"] - f["L"]) / f["R"] < 0.05 and not f.get("diverged") else NOT_REPRODUCED


def _block_v2(f):
    return _equivalence(f.get("rel"), 0.05, f.get("diverged"))


# ---- The regime study: cells (dict cell -> cost of the frozen random soft gate against dense at seed 0, either
# reading; None when not run). A cell "binds" when that cost is at least +10%.
def _regime_v1(f):
    costs = [c for c in (f.get("cells") or {}).values() if c is not None]
    if not costs:
        return None
    return "a regime binds" if max(costs) >= 0.10 else "no regime binds"


# ---- Experiment 1 with power (run only in a cell that binds): share (stats.Paired over seeds of the share of the
# random-to-dense gap the learned gate closes, (R_i - L_i) / (R_i - D_i), each seed's own dense run), diverged
def _exp1_power_v1(f):
    s = f.get("share")
    if s is None:
        return None
    if f.get("diverged"):
        return NOT_REPRODUCED
    if s.lo is None:
        return unresolvable(s.n)
    return REPRODUCED if s.hi < 0.25 else NOT_REPRODUCED if s.lo >= 0.25 else unresolvable(s.n)


_4K = "the 4,000-step compact suite (results/compact-4k), committed 2026-11-23"


_PENDING = "written before the runs it judges"


CRITERIA: dict[str, tuple[Rule, ...]] = {
    "exp1": (
        Rule("the learned soft gate closes less than 25% of the random-to-dense gap (paper: 9%)",
             "2026-11-23T01:12:11Z", "d58afb4", _exp1_v1),
        Rule("the learned soft gate ends within 5% of the frozen random one, and no learned run diverged",
             "2026-11-23T01:36:30Z", "d27a54c", _exp1_v2,
             seen="the first 20 compact units (4,000 steps), Exp. 1 among them"),
        Rule("as before; 'partly' when it holds but the frozen random soft gate costs less than 5% against dense",
             "2026-11-25T03:05:19Z", "30a55e4", _exp1_v3, seen=_4K),
        Rule("paired over seeds: the 95% interval of (random - learned) / random lies inside +-5% and no learned run "
             "diverged; 'not reproduced' when the interval lies outside +-5%; 'not resolvable' when it straddles "
             "+-5%, or when the frozen random soft gate costs under 10% against dense (then nothing is there to be "
             "absorbed, so no outcome can test absorption)",
             "2026-12-02T17:47:36Z", "8978652", _exp1_v4,
             seen="the 10,000-step compact suite, 3 seeds (learned 100.34 +- 1.13, random 98.92 +- 1.27, dense 97.18)"),
    ),
    "exp2": (
        Rule("the gate's gradient under hard top-k is exactly zero and learned and frozen random gates end within 0.1% "
             "of each other", "2026-11-23T01:12:11Z", "d58afb4", _exp2_v1),
    ),
    "exp3": (
        Rule("a BCE gate deployed with hard top-k on the co-adapted checkpoint is at least 2x worse than on the dense "
             "one (paper 12.4x)", "2026-11-23T01:12:11Z", "d58afb4", _exp3_v1),
        Rule("as before; 'partly' when the co-adapted source checkpoint had itself diverged", "2026-11-25T03:05:19Z",
             "30a55e4", _exp3_v2, seen=_4K),
        Rule("paired over seeds (dense and soft-gated checkpoints trained at the same seed): the lower end of the 95% "
             "interval of the mean log ratio is at least log 2 ('not reproduced' when the upper end is below it; "
             "'partly' as before when a source diverged)", "2026-12-02T17:47:36Z", "8978652", _exp3_v3,
             seen="seed 0 of the 10,000-step suite (11.4x); " + _PENDING + " (seeds 1 and 2)"),
    ),
    "exp4": (
        Rule("the stochastically trained model deployed dense is at least 1.25x the dense baseline (paper 2.10x)",
             "2026-11-23T01:12:11Z", "d58afb4", _exp4_v1),
        Rule("as before; 'partly' at 1.05x to 1.25x", "2026-11-25T03:05:19Z", "30a55e4", _exp4_v2,
             seen="the 4,000-step result, 1.19x, which the first rule judged 'not reproduced'"),
        Rule("paired over seeds (each stochastic run against the dense run of its seed): the lower end of the 95% "
             "interval of the mean ratio is at least 1.25x; 'not reproduced' when the upper end is below 1.25x; "
             "otherwise 'not resolvable'. No 'partly' tier", "2026-12-02T17:47:36Z", "8978652", _exp4_v3,
             seen="seed 0 of the 10,000-step suite (1.18x); " + _PENDING + " (seeds 1 and 2)"),
    ),
    "table4": (
        Rule("the KL gate at the protocol's k closes at least 90% of the random-to-oracle gap (paper about 94%)",
             "2026-11-25T03:05:19Z", "30a55e4", _table4_v1, seen=_4K),
    ),
    "table5": (
        Rule("gate-only task training ends within 1% of dense and the frozen random gate at least 10% worse than dense "
             "('partly': one of the two)", "2026-11-25T03:05:19Z", "30a55e4", _table5_v1, seen=_4K),
        Rule("paired over gate seeds: the 95% interval of learned / dense - 1 lies inside +-1% and the lower end of "
             "random / dense - 1 is at least +10%; 'partly' when one holds; 'not reproduced' when the learned interval "
             "lies outside +-1% and the random one below +10%; else 'not resolvable'", "2026-12-02T17:47:36Z", "8978652",
             _table5_v2, seen="the 10,000-step suite, 3 seeds"),
    ),
    "block": (
        Rule("absorbed: the learned soft block gate ends within 5% of the frozen random one and no learned run "
             "diverged", "2026-11-25T03:29:34Z", "ab3ef03", _block_v1),
        Rule("paired over seeds: absorbed when the 95% interval of (random - learned) / random lies inside +-5%; not "
             "absorbed when it lies outside; otherwise not resolvable", "2026-12-02T17:47:36Z", "8978652", _block_v2,
             seen="the causal block ablation, 3 seeds (learned 3.7% better than random)"),
    ),
    "regime": (
        Rule("a cell of the regime grid binds when its frozen random soft gate (either reading, seed 0) costs at least "
             "+10% against the dense run of the same cell; the study reports which factors reach that, and if none "
             "does, that end-to-end training absorbed even a random soft gate in every regime tried",
             "2026-12-02T17:47:36Z", "8978652", _regime_v1, seen=_PENDING),
    ),
    "exp1-power": (
        Rule("in a cell that binds, learned vs frozen random soft gate and dense at 3 seeds: reproduced when the upper "
             "end of the 95% interval of the share of the random-to-dense gap the learned gate closes, (R_i - L_i) / "
             "(R_i - D_i), is below 25% (the paper's 9%) and no learned run diverged; not reproduced when its lower "
             "end is at least 25%; otherwise not resolvable", "2026-12-02T17:47:36Z", "8978652", _exp1_power_v1,
             seen=_PENDING),
    ),
}


def current(key: str) -> Rule:
    return CRITERIA[key][-1]


def first(key: str) -> Rule:
    return CRITERIA[key][0]


def revised_after_results(key: str, unit_times: list[str]) -> Rule | None:
    """The first revision of `key`'s rule written after results: after the earliest of `unit_times` (ISO UTC
    strings of the verdict's units' `finished_at`) or, by the record, after results of the experiment existed
    (`seen`). None when every rule in force was written before any result."""
    earliest = min((t for t in unit_times if t), default=None)
    for rule in CRITERIA[key][1:]:
        if rule.seen and rule.seen != _PENDING or earliest is not None and rule.written > earliest:
            return rule
    return None
