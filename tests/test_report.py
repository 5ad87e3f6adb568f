"""The reading study's written rule: facts scored per reading, the default chosen by the count, ties by order."""
import json
from pathlib import Path

import pytest

from gatelab.config import DEFAULT_READING, READINGS, Routing
from gatelab.reproduce.report.compact import READING_FACTS, reading_study, write_report


def _unit(evals: dict, **kw) -> dict:
    return dict(evals=evals, **kw)


def _results(per_reading: dict, dense=100.0, exp3_dense=110.0) -> dict:
    """A results dict with every study unit; per_reading[r] = (exp1 learned, exp1 random, max grad, table5 learned,
    table5 step 500, table5 random, exp3 co-adapted)."""
    R = {"dense": _unit({"dense": dense}), "exp3-bce-on-dense": _unit({"gate-topk@k=64": exp3_dense})}
    for r, (l1, r1, grad, t5l, t5l500, t5r, e3) in per_reading.items():
        R[f"exp1-{r}-learned-s0"] = _unit({"soft-gate[x]": l1}, max_grad_norm=grad)
        R[f"exp1-{r}-random-s0"] = _unit({"soft-gate[x]": r1}, max_grad_norm=1.0)
        R[f"table5-{r}-learned-s0"] = _unit({"soft-gate[x]": t5l}, curve=[[100, 150.0], [500, t5l500]])
        R[f"table5-{r}-random-s0"] = _unit({"soft-gate[x]": t5r}, curve=[])
        R[f"exp3-bce-on-exp1-{r}-learned-s0"] = _unit({"gate-topk@k=64": e3})
    return R


GOOD = (120.0, 121.0, 3.0, 100.5, 100.9, 115.0, 300.0)  # satisfies every fact
BAD = (900.0, 101.0, 1e9, 130.0, 140.0, 101.0, 120.0)  # satisfies none


def test_every_fact_is_scored_and_the_most_satisfied_reading_wins():
    names = list(READINGS)
    R = _results({r: (GOOD if r == names[2] else BAD) for r in names})
    study = reading_study(R)
    assert study["complete"] and study["chosen"] == names[2]
    assert study["readings"][names[2]]["score"] == len(READING_FACTS)
    assert study["readings"][names[0]]["score"] == 0
    assert set(study["readings"][names[0]]["facts"]) == {f[0] for f in READING_FACTS}


def test_ties_go_to_the_reading_listed_first_and_incomplete_studies_choose_nothing():
    names = list(READINGS)
    R = _results({r: (GOOD if r in names[1:3] else BAD) for r in names})
    assert reading_study(R)["chosen"] == names[1]
    del R[f"exp3-bce-on-exp1-{names[3]}-learned-s0"]
    study = reading_study(R)
    assert study["chosen"] is None and not study["complete"]
    assert study["readings"][names[3]]["facts"]["exp3-contrast"] is None  # not measured: not satisfied


def test_a_diverged_run_fails_the_stability_fact_only_by_its_gradient_norm():
    names = list(READINGS)
    row = list(GOOD)
    row[2] = 2e3
    study = reading_study(_results({r: (tuple(row) if r == names[0] else GOOD) for r in names}))
    assert study["readings"][names[0]]["facts"]["exp1-stable"] is False
    assert study["readings"][names[0]]["score"] == len(READING_FACTS) - 1
    assert study["chosen"] == names[1]


def test_the_default_reading_is_the_one_routing_uses():
    r = Routing(mode="soft-gate")
    assert dict(soft_mask=r.soft_mask, soft_renormalize=r.soft_renormalize) == READINGS[DEFAULT_READING]


COMPACT = Path(__file__).resolve().parents[1] / "results" / "compact"


@pytest.mark.skipif(not (COMPACT / "units" / "exp3-bce-on-dense" / "result.json").is_file(),
                    reason="the compact reading study has not been committed yet")
def test_the_committed_reading_study_chooses_the_default_reading():
    """config.DEFAULT_READING must be what the written rule picks from the committed measurements."""
    R = {}
    for f in (COMPACT / "units").glob("*/result.json"):
        r = json.loads(f.read_text())
        R[r["name"]] = r
    study = reading_study(R)
    assert study["complete"], "the committed study lacks units"
    assert study["chosen"] == DEFAULT_READING


@pytest.mark.parametrize("folder,suite", [("compact", "31m"), ("pretrained", "pretrained")])
def test_committed_reports_are_what_gatelab_report_rebuilds(tmp_path, folder, suite):
    """`gatelab report` on a copy of the committed per-unit results and NOTES.md gives the committed REPORT.md byte for
    byte: no report is left stale after its notes or units change (regenerate with `gatelab report --protocol compact`
    and `gatelab report --suite pretrained`). results/compact-4k is an archive of an earlier protocol, not rebuilt."""
    import shutil
    src = Path(__file__).resolve().parents[1] / "results" / folder
    shutil.copytree(src, tmp_path / folder)
    if suite == "pretrained":
        from gatelab.reproduce.pretrained import PROTOCOLS as PRETRAINED
        from gatelab.reproduce.report.pretrained import write_pretrained_report
        path = write_pretrained_report(tmp_path / folder, PRETRAINED["compact"])
    else:
        from gatelab.reproduce.suite import PROTOCOLS, unit_names
        path = write_report(tmp_path / folder, PROTOCOLS["compact"], unit_names(PROTOCOLS["compact"]))
    assert path.read_text() == (src / "REPORT.md").read_text()


def test_a_report_is_not_written_over_units_of_another_protocol(tmp_path):
    """The archived 4,000-step suite is not rewritten under the compact protocol's 10,000-step header."""
    import shutil

    from gatelab.config import GatelabError
    from gatelab.reproduce.suite import PROTOCOLS, unit_names
    src = Path(__file__).resolve().parents[1] / "results" / "compact-4k"
    shutil.copytree(src / "units", tmp_path / "units")
    with pytest.raises(GatelabError, match="4,000 steps, not the compact protocol's 10,000"):
        write_report(tmp_path, PROTOCOLS["compact"], unit_names(PROTOCOLS["compact"]))
    assert not (tmp_path / "REPORT.md").exists()
