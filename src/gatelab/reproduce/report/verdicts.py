"""What a report's sections share: reading unit results, formatting numbers, and judging a verdict by its rules
(criteria.py), with the history of those rules beside the outcome."""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from gatelab.reproduce.report import criteria


def load_results(out: Path) -> dict[str, dict]:
    res = {}
    for f in sorted((Path(out) / "units").glob("*/result.json")):
        r = json.loads(f.read_text())
        res[r["name"]] = r
    return res


def mean_std(values: list[float]) -> tuple[float, float] | None:
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def ms(v) -> str:
    return "not run" if v is None else f"{v[0]:.2f} +- {v[1]:.2f}"


def num(v, digits: int = 2) -> str:
    return "not run" if v is None else f"{v:.{digits}f}"


def evaluation(r: dict | None, prefix: str):
    """A unit's first evaluation whose routing label starts with `prefix` (fixed random masks other than seed 0
    aside)."""
    if not r:
        return None
    for key, val in r["evals"].items():
        if key.startswith(prefix) and "#seed" not in key:
            return val
    return None


def diverged(r: dict | None) -> bool:
    """A training run diverged: its gradient norm went above 1e3 (stable runs here stay below ~20)."""
    return bool(r) and (r.get("max_grad_norm") or 0) > 1e3


def seeds_of(R: dict, name_at: callable, seeds: int) -> list:
    """The results name_at(0), name_at(1), ... that exist, in seed order, stopping at the first missing seed."""
    found = []
    for s in range(seeds):
        if name_at(s) not in R:
            break
        found.append(R[name_at(s)])
    return found


@dataclass
class Verdict:
    """One verdict line: its rules are criteria.CRITERIA[key]; `facts` is what the rules read; `measured` says in
    words what was measured; `units` are the result names it judges (their finish times decide whether a rule
    was revised after results); `words` renames statuses (the block ablation's "absorbed")."""

    key: str
    title: str
    facts: dict
    measured: str
    units: list = field(default_factory=list)
    words: dict = field(default_factory=dict)

    def status(self, rule: criteria.Rule) -> str | None:
        s = rule.judge(self.facts)
        return None if s is None else self.words.get(s, s)

    def revised(self, R: dict) -> criteria.Rule | None:
        times = [R[n].get("finished_at") for n in self.units if n in R]
        return criteria.revised_after_results(self.key, times)

    def line(self, R: dict) -> str:
        rules = criteria.CRITERIA[self.key]
        now, first = rules[-1], rules[0]
        text = (f"- **{self.title}: {self.status(now) or 'not judged'}.** {self.measured}. Criterion "
                f"({_when(now)}): {now.text}.")
        if len(rules) > 1:
            revised = self.revised(R)
            tag = "criterion revised after results" if revised else "criterion revised before its results"
            text += (f" *{tag}*: first written ({_when(first)}): {first.text}; under it: "
                     f"**{self.status(first) or 'not judged'}**.")
        return text


def _when(rule: criteria.Rule) -> str:
    return f"commit {rule.commit}, {rule.written[:10]}"


def criteria_section(verdicts: list[Verdict], R: dict) -> list[str]:
    """Every rule each verdict has had, in the order written, with what it says of today's results."""
    lines = ["## Criteria and their history", "",
             "Each verdict's rules live in `src/gatelab/reproduce/report/criteria.py`, in the order they were written; the last is in "
             "force, a rule is never edited in place. \"Seen\" is what had been measured of that experiment when the "
             "rule was written. A rule written after results is marked; the verdict under the first-written rule is "
             "shown beside the current one.", "",
             "| verdict | rule | written | seen when written | today's results under it |", "|---|---|---|---|---|"]
    for v in verdicts:
        rules = criteria.CRITERIA[v.key]
        for i, rule in enumerate(rules):
            label = ("first" if i == 0 else f"revision {i}") + (" (in force)" if i == len(rules) - 1 else "")
            lines.append(f"| {v.title if i == 0 else ''} | {label}: {rule.text} | {_when(rule)} | "
                         f"{rule.seen or 'nothing'} | {v.status(rule) or 'not judged'} |")
    return lines
