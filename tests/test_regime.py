"""The regime study: its grid, the units it adds to a suite, training on a share of the corpus, and how its
report judges the predictions against seed noise."""
import numpy as np
import pytest

from gatelab.config import GatelabError, TrainConfig
from gatelab.data import TokenData
from gatelab.reproduce import regime
from gatelab.reproduce.report.regime import _order, outcomes
from gatelab.reproduce.suite import PROTOCOLS, Suite


def test_each_compact_cell_changes_one_factor_of_the_base():
    for cell in regime.COMPACT_GRID[1:]:
        changed = [bool(cell.model), cell.steps != 1.0, cell.train_fraction != 1.0, cell.scale != 1.0]
        assert sum(changed) == (2 if cell.name == "data16-steps30k" else 1), cell.name
    names = [c.name for c in regime.COMPACT_GRID]
    assert len(names) == len(set(names)) and names[0] == "base"


def test_base_and_scale_cells_reuse_the_suites_own_runs():
    base, scale10 = regime.COMPACT_GRID[0], next(c for c in regime.COMPACT_GRID if c.name == "scale10")
    assert regime.unit_name(base, "dense") == regime.unit_name(scale10, "dense") == "dense"
    assert regime.unit_name(base, "soft-sigmoid-renorm") == "exp1-sigmoid-renorm-random-s0"
    assert regime.unit_name(scale10, "soft-sigmoid") == "regime-scale10-soft-sigmoid"
    data16 = next(c for c in regime.COMPACT_GRID if c.name == "data16")
    assert regime.unit_name(data16, "dense") == "regime-data16-dense"


def test_regime_units_train_what_their_cell_says():
    suite = Suite(PROTOCOLS["compact"], "-", "-", progress=False)
    cfg = lambda n: suite.units[n].params["cfg"]  # noqa: E731
    assert cfg("regime-scale10-soft-sigmoid").routing.soft_temperature == pytest.approx(0.1)
    assert cfg("regime-scale10-soft-sigmoid").model.gate == "random"
    assert cfg("regime-data16-dense").train_fraction == pytest.approx(1 / 16)
    assert cfg("regime-small-dense").model.n_layer == 2 and cfg("regime-small-dense").model.d_model == 128
    assert cfg("regime-steps4k-dense").steps == 4000 and cfg("regime-data16-steps30k-dense").steps == 30_000
    assert cfg("regime-base-random-topk").routing.mode == "random-topk"
    assert all(suite.units[n].experiment == "regime" for n in suite.units if n.startswith("regime-"))


def test_train_fraction_reads_only_the_first_share_of_the_split(token_corpus):
    full, quarter = TokenData(token_corpus, "train"), TokenData(token_corpus, "train", fraction=0.25)
    assert len(quarter) == len(full) // 4
    assert np.array_equal(np.asarray(quarter.tokens), np.asarray(full.tokens[:len(quarter)]))
    x, _ = quarter.batch(step=3, batch_size=64, context=32, seed=0)
    windows = {tuple(np.asarray(full.tokens[s:s + 32])) for s in range(len(quarter) - 32)}
    assert all(tuple(row.tolist()) in windows for row in x)
    for bad in (0, -0.5, 1.5):
        with pytest.raises(GatelabError, match="train_fraction must be > 0 and <= 1"):
            TrainConfig(train_fraction=bad).validate()


def test_predicted_orders_count_only_beyond_seed_noise():
    assert _order([0.01, 0.10, 0.30], increasing=True, threshold=0.05) == "supported"
    assert _order([0.01, 0.03, 0.30], increasing=True, threshold=0.05) == "not resolvable"
    assert _order([0.30, 0.03], increasing=True, threshold=0.05) == "contradicted"
    assert _order([0.01, None], increasing=True, threshold=0.05) is None
    table = {"base": {"dense": (100.0, 0.0), "soft-sigmoid": (103.0, 0.03), "soft-sigmoid-renorm": (101.0, 0.01)},
             "scale10": {"dense": (100.0, 0.0), "soft-sigmoid": (99.0, -0.01), "soft-sigmoid-renorm": (99.0, -0.01)},
             "small": {"dense": (120.0, 0.0), "soft-sigmoid": (150.0, 0.25)}}
    judged = outcomes(table, threshold=0.05)
    assert judged["H0 absorption everywhere"] == "contradicted"  # small's +25%
    assert judged["H3 saturation"] == "not resolvable" and judged["H5 model size"] == "supported"
    assert judged["H2 training length"] is None  # its cells did not run
