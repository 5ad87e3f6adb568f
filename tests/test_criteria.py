"""Verdict rules with their history (criteria.py), paired statistics (stats.py), and how a report shows a rule
that changed after its results."""
import json
import math
from dataclasses import replace

import pytest
from scipy import stats as scipy_stats

from gatelab.reproduce.report import criteria
from gatelab.reproduce.report.compact import write_report
from gatelab.reproduce.report.stats import of_differences, paired
from gatelab.reproduce.report.verdicts import Verdict
from gatelab.reproduce.suite import PROTOCOLS, unit_names


def test_paired_interval_and_detectable_effect_match_a_t_test():
    a, b = [10.0, 11.0, 12.5, 9.0], [10.9, 12.6, 13.0, 10.2]
    p = paired(a, b)
    diffs = [y - x for x, y in zip(a, b)]
    assert p.diffs == tuple(diffs) and p.n == 4
    assert p.mean == pytest.approx(sum(diffs) / 4)
    ci = scipy_stats.ttest_rel(b, a).confidence_interval(0.95)
    assert (p.lo, p.hi) == (pytest.approx(ci.low), pytest.approx(ci.high))
    se = p.sd / 2
    assert p.detectable == pytest.approx((scipy_stats.t.ppf(0.975, 3) + scipy_stats.t.ppf(0.8, 3)) * se)
    # an effect of exactly the detectable size is found about 80% of the time by the two-sided t-test
    nc = p.detectable / se
    power = 1 - scipy_stats.nct.cdf(scipy_stats.t.ppf(0.975, 3), 3, nc) + scipy_stats.nct.cdf(-scipy_stats.t.ppf(0.975, 3), 3, nc)
    assert 0.75 < power < 0.85


def test_one_seed_has_no_interval_and_unequal_lengths_are_refused():
    one = of_differences([0.3])
    assert one.lo is None and one.detectable is None and not one.within(-1, 1) and not one.outside(-1, 1)
    assert "1 seed" in one.describe()
    assert of_differences([]) is None
    with pytest.raises(ValueError):
        paired([1.0, 2.0], [1.0])


def test_within_and_outside_use_the_whole_interval():
    p = of_differences([0.01, 0.02, 0.03])
    assert p.within(-0.05, 0.05) and not p.outside(-0.05, 0.05)
    wide = of_differences([-0.04, 0.02, 0.09])  # straddles +5%
    assert not wide.within(-0.05, 0.05) and not wide.outside(-0.05, 0.05)
    far = of_differences([0.20, 0.21, 0.22])
    assert far.outside(-0.05, 0.05)


def test_every_verdict_keeps_its_rules_in_the_order_written():
    for key, rules in criteria.CRITERIA.items():
        assert rules, key
        assert [r.written for r in rules] == sorted(r.written for r in rules), key
        assert all(r.commit and r.text for r in rules), key


def test_exp4_first_rule_is_kept_and_a_partly_tier_does_not_reach_back():
    facts = dict(ratio=1.18, ratios=of_differences([1.178, 1.159, 1.163]))
    first, partly, paired_rule = criteria.CRITERIA["exp4"]
    assert first.judge(facts) == "not reproduced"
    assert partly.judge(facts) == "partly"
    assert paired_rule.judge(facts) == "not reproduced"  # the whole interval is below 1.25x
    assert paired_rule.judge(dict(ratios=of_differences([1.1, 1.4, 1.3]))).startswith("not resolvable")
    assert paired_rule.judge(dict(ratios=of_differences([1.30, 1.31, 1.32]))) == "reproduced"


def test_exp1_is_not_resolvable_where_a_random_gate_costs_nothing():
    rel = of_differences([0.021, 0.022, 0.023])
    rule = criteria.current("exp1")
    assert rule.judge(dict(rel=rel, cost=0.02)).startswith("not resolvable with 3 seeds")
    assert rule.judge(dict(rel=rel, cost=0.30)) == "reproduced"
    assert rule.judge(dict(rel=rel, cost=0.30, diverged=True)) == "not reproduced"
    assert rule.judge(dict(rel=of_differences([0.2, 0.25, 0.22]), cost=0.30)) == "not reproduced"


def test_exp3_paired_rule_needs_the_lower_end_above_2x():
    rule = criteria.current("exp3")
    assert rule.judge(dict(log_ratio=of_differences([math.log(x) for x in (11.4, 12.2, 16.6)]))) == "reproduced"
    assert rule.judge(dict(log_ratio=of_differences([math.log(x) for x in (1.1, 1.2, 1.15)]))) == "not reproduced"
    assert rule.judge(dict(log_ratio=of_differences([math.log(x) for x in (1.1, 9.0, 2.5)]))).startswith("not resolv")


def _units(tmp_path, finished_at):
    out = tmp_path / "results"
    for name, value in (("exp4-stochastic", 120.0), ("dense", 100.0)):
        unit = out / "units" / name
        unit.mkdir(parents=True)
        (unit / "result.json").write_text(json.dumps(dict(name=name, evals={"dense": value}, wall_s=1.0, device="cpu",
                                                          curve=[], finished_at=finished_at)))
    return out


def _exp4_line(out) -> str:
    protocol = replace(PROTOCOLS["smoke"], seeds=1)
    report = write_report(out, protocol, unit_names(protocol)).read_text()
    return next(line for line in report.splitlines() if line.startswith("- **4. Stochastic"))


def test_report_marks_a_criterion_revised_after_a_units_finish_time(tmp_path, monkeypatch):
    first = criteria.Rule("ratio at least 1.5", "2026-01-01T00:00:00Z", "aaaaaaa",
                          lambda f: "reproduced" if f["ratio"] >= 1.5 else "not reproduced")
    later = criteria.Rule("ratio at least 1.1", "2026-03-01T00:00:00Z", "bbbbbbb",
                          lambda f: "reproduced" if f["ratio"] >= 1.1 else "not reproduced")
    monkeypatch.setitem(criteria.CRITERIA, "exp4", (first, later))
    line = _exp4_line(_units(tmp_path / "a", "2026-02-01T00:00:00Z"))  # the unit finished between the two rules
    assert "**4. Stochastic masking does not help (Exp. 4): reproduced.**" in line
    assert "*criterion revised after results*" in line
    assert "first written (commit aaaaaaa, 2026-01-01): ratio at least 1.5; under it: **not reproduced**" in line
    line = _exp4_line(_units(tmp_path / "b", "2026-04-01T00:00:00Z"))  # the unit finished after both rules
    assert "*criterion revised before its results*" in line and "under it: **not reproduced**" in line


def test_a_verdict_with_one_rule_shows_no_history():
    v = Verdict("exp2", "2. Hard top-k", dict(exactly_zero=True, hl=10.0, hr=10.0), "measured", [])
    line = v.line({})
    assert ": reproduced.**" in line and "first written" not in line and "commit d58afb4" in line


def test_committed_compact_report_shows_exp4_under_its_first_rule():
    from pathlib import Path
    report = (Path(__file__).resolve().parents[1] / "results" / "compact" / "REPORT.md").read_text()
    line = next(line for line in report.splitlines() if line.startswith("- **4. Stochastic"))
    assert "*criterion revised after results*" in line
    assert "first written (commit d58afb4, 2026-11-23)" in line and "under it: **not reproduced**" in line
