"""`gatelab reproduce`: every 31M-model experiment of the paper as resumable units, then a report.

A unit is one training, distillation, evaluation or analysis with a name. Its small outputs (metrics,
evaluation, result.json) go to `<out>/units/<name>/`; its checkpoints to `<runs>/<name>/` (kept out of git).
A unit whose result.json exists is skipped; a killed unit resumes from its checkpoint; a unit whose
dependency's checkpoint is gone (e.g. on a fresh machine) retrains that dependency first.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from gatelab.config import (
    DEFAULT_READING, READINGS, GatelabError, ModelConfig, Routing, TrainConfig, soft_gate_routing, write_json
)
from gatelab.data import prepare
from gatelab.progress import progress_bar
from gatelab.reproduce import regime
from gatelab.reproduce.report.compact import write_report
from gatelab.reproduce.units import (
    _device_name, run_analyze, run_block_distill, run_distill, run_eval, run_train, utc_now
)
from gatelab.reproduce.workers import _die_with_parent, _worker_label, workers_for
from gatelab.training.train import train


@dataclass
class Protocol:
    name: str
    corpus: str
    data: str
    model: dict
    steps: int  # every end-to-end training run (dense, Experiments 1, 2, 4)
    batch_size: int
    k: int
    seeds: int
    distill_steps: int  # KL / BCE gates (paper: 1,000)
    task_steps: int  # gate-only task training (paper's Table 5: 10,000, converged by 500)
    topk_ks: tuple = (64, 128, 256)
    eval_tokens: int = 0  # 0 = the whole validation split
    analysis_batches: int = 8
    random_mask_seeds: int = 5
    lr: float = 6e-4
    warmup_steps: int = 500
    eval_every: int = 500
    task_eval_every: int = 100
    note: str = ""
    # block routing: the block absorption ablation's blocks, kept key blocks, steps (None: `steps`)
    # and the soft block gate's reading (READINGS): the default reading, which the reading study chose, so the
    # block ablation is compared with Experiment 1 under the same reading
    block_size: int = 32
    block_k: int = 2
    block_steps: int | None = None
    block_reading: str = DEFAULT_READING
    block_seeds: int | None = None  # None: `seeds`


PROTOCOLS = {
    "paper": Protocol("paper", "wikitext-103", "data/prepared/wikitext-103", {}, steps=50_000, batch_size=16, k=64,
                      seeds=3, distill_steps=1000, task_steps=10_000, warmup_steps=1000, eval_every=2500,
                      task_eval_every=500,
                      note="The paper's settings on WikiText-103 (run `gatelab prepare --corpus wikitext-103 --source DIR` "
                           "first)."),
    "compact": Protocol("compact", "bundled", "data/prepared/bundled", {}, steps=10_000, batch_size=16, k=64, seeds=3,
                        distill_steps=1000, task_steps=1000, block_steps=2000,
                        note="The paper's model and batch on the bundled corpus. 10,000 steps: where the dense "
                             "model's validation perplexity bottoms out on this corpus (results/dense-curve/: 99.6 at "
                             "step 10,000, 101.5 at 12,000), so every run is compared at the dense optimum. The block "
                             "ablation trains 2,000 steps, with its own dense baseline of 2,000 steps."),
    "smoke": Protocol("smoke", "bundled", "data/prepared/bundled",
                      dict(n_layer=2, d_model=64, n_head=4, d_mlp=128, context=64, d_gate=8), steps=20, batch_size=4,
                      k=8, seeds=2, distill_steps=10, task_steps=10, topk_ks=(8, 16, 32), eval_tokens=2048,
                      analysis_batches=1, random_mask_seeds=2, lr=2e-3, warmup_steps=2, eval_every=10,
                      task_eval_every=5, block_size=8, block_k=2, block_seeds=1,
                      note="A tiny model for minutes on CPU: checks the pipeline, not the science."),
}


@dataclass
class Unit:
    name: str
    experiment: str
    run: Callable[["Suite", "Unit"], dict]
    needs: list[str] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    also: tuple = ()  # further groups that select it (e.g. "readings": the reading study)


class UnitSuite:
    """What both reproduction suites share (this one and the pretrained one): named units, each finished once
    `<out>/units/<name>/result.json` exists; selection by unit name, group or name prefix; and a sequential run
    that skips finished units and starts no new one after a time budget. Subclasses fill `self.units` and
    implement `group` and `run_unit` (the unit's result, with whatever the suite records beside it)."""

    out: Path
    units: dict
    label = "reproduce"
    groups = "experiments"

    def group(self, unit) -> str:
        raise NotImplementedError

    def run_unit(self, unit) -> dict:
        raise NotImplementedError

    def unit_dir(self, name: str) -> Path:
        return self.out / "units" / name

    def is_done(self, name: str) -> bool:
        return (self.unit_dir(name) / "result.json").is_file()

    def select(self, only: list[str] | None) -> list:
        if not only:
            return list(self.units.values())

        def matches(u, o: str) -> bool:  # an exact unit name selects that unit alone
            return u.name == o if o in self.units else (self.group(u) == o or o in getattr(u, "also", ())
                                                        or u.name.startswith(o))
        chosen = [u for u in self.units.values() if any(matches(u, o) for o in only)]
        groups = sorted({g for u in self.units.values() for g in (self.group(u), *getattr(u, "also", ()))})
        if not chosen:
            raise GatelabError(f"--only {','.join(only)} matches no unit; units: {', '.join(self.units)}; "
                               f"{self.groups}: {', '.join(groups)}")
        return chosen

    def run(self, only: list[str] | None = None, budget_s: float | None = None) -> dict:
        """Run the selected units that are not done, in order. Stops starting new units after budget_s."""
        t0 = time.time()
        status = {}
        for unit in self.select(only):
            if self.is_done(unit.name):
                status[unit.name] = "done (skipped)"
                continue
            if budget_s is not None and time.time() - t0 > budget_s:
                status[unit.name] = "not started (budget)"
                continue
            start = time.time()
            print(f"[{self.label}] {unit.name} ...", flush=True)
            result = self.run_unit(unit)
            result.update(name=unit.name, wall_s=time.time() - start, finished_at=utc_now())
            write_json(self.unit_dir(unit.name) / "result.json", result)
            status[unit.name] = f"ran in {time.time() - start:.0f} s"
        return status


class Suite(UnitSuite):
    def __init__(self, protocol: Protocol, out: str | Path, runs: str | Path, progress: bool = True,
                 device: str = "auto"):
        self.p, self.out, self.runs = protocol, Path(out), Path(runs)
        self.progress, self.device = progress, device
        self.units: dict[str, Unit] = {}
        self._build()

    # -------------------------------------------------------------------------------------------------------
    def train_config(self, gate: str, routing: Routing, seed: int = 0, block_gate: str = "none",
                     steps: int | None = None, model: dict | None = None, train_fraction: float = 1.0) -> TrainConfig:
        p = self.p
        steps = steps or p.steps
        return TrainConfig(model=ModelConfig(**{**p.model, **(model or {})}, gate=gate, block_gate=block_gate),
                           routing=routing, data=p.data, train_fraction=train_fraction, steps=steps,
                           batch_size=p.batch_size, lr=p.lr, min_lr=p.lr / 10,
                           warmup_steps=min(p.warmup_steps, max(1, steps // 4)), seed=seed, eval_every=p.eval_every,
                           eval_tokens=p.eval_tokens, checkpoint_every=max(p.eval_every, steps // 8),
                           device=self.device)

    def add(self, name, experiment, run, needs=(), also=(), **params):
        self.units[name] = Unit(name, experiment, run, list(needs), params, tuple(also))

    def _build(self) -> None:
        """The units. Soft-gate units are named by their reading (config.READINGS): Experiment 1, Table 5 and
        Experiment 3 run every reading at seed 0 (the reading study, `--only readings`) and the default reading
        (config.DEFAULT_READING) at every seed; the report's headline tables use the default reading."""
        p, k = self.p, self.p.k
        soft = lambda reading: soft_gate_routing(reading, k)  # noqa: E731
        self.add("dense", "baseline", run_train, cfg=self.train_config("none", Routing()),
                 evals=[Routing()] + [Routing(mode=m, k=kk) for m in ("oracle-topk", "random-topk")
                                      for kk in p.topk_ks])
        self.add("fig1-concentration", "figure1", run_analyze, needs=["dense"], base="dense")
        for reading in READINGS:
            for seed in range(p.seeds if reading == DEFAULT_READING else 1):
                study = ("readings",) if seed == 0 else ()
                for gate in ("learned", "random"):
                    self.add(f"exp1-{reading}-{gate}-s{seed}", "exp1", run_train, also=study,
                             cfg=self.train_config(gate, soft(reading), seed), evals=[soft(reading)], reading=reading)
                    self.add(f"table5-{reading}-{gate}-s{seed}", "table5", run_distill, needs=["dense"], also=study,
                             base="dense", loss="task", k=k, seed=seed, reading=reading,
                             random_control=gate == "random")
        hard = Routing(mode="gate-topk", k=k)
        for gate in ("learned", "random"):
            self.add(f"exp2-hard-{gate}", "exp2", run_train, cfg=self.train_config(gate, hard), evals=[hard])
        self.add("exp2-gradient-check", "exp2", run_analyze, needs=["exp2-hard-learned"], base="exp2-hard-learned")
        self.add("exp3-bce-on-dense", "exp3", run_distill, needs=["dense"], also=("readings",), base="dense",
                 loss="bce", k=k)
        for reading in READINGS:
            base = f"exp1-{reading}-learned-s0"
            self.add(f"exp3-bce-on-{base}", "exp3", run_distill, needs=[base], also=("readings",), base=base,
                     loss="bce", k=k, reading=reading)
        stoch = Routing(mode="stochastic", k=k)
        self.add("exp4-stochastic", "exp4", run_train, cfg=self.train_config("none", stoch),
                 evals=[Routing(), stoch] + [Routing(mode="random-topk", k=k, seed=s)
                                             for s in range(p.random_mask_seeds)])
        for kk in p.topk_ks:
            self.add(f"table4-kl-{kk}", "table4", run_distill, needs=["dense"], base="dense", loss="kl", k=kk)
        self._build_seeds()
        self._build_block()
        self._build_regime()

    def _build_seeds(self) -> None:
        """Experiments 3 and 4 at seeds 1.. (seed 0 is above): a dense run per seed, the stochastically trained
        model of that seed, and BCE gates on that seed's dense and soft-gated (Exp. 1 learned) checkpoints, so each
        seed gives one paired comparison."""
        p, k = self.p, self.p.k
        stoch = Routing(mode="stochastic", k=k)
        for seed in range(1, p.seeds):
            dense = f"dense-s{seed}"
            self.add(dense, "baseline", run_train, also=("exp3", "exp4"), cfg=self.train_config("none", Routing(), seed),
                     evals=[Routing()])
            self.add(f"exp4-stochastic-s{seed}", "exp4", run_train, cfg=self.train_config("none", stoch, seed),
                     evals=[Routing(), stoch] + [Routing(mode="random-topk", k=k, seed=s)
                                                 for s in range(p.random_mask_seeds)])
            for base in (dense, f"exp1-{DEFAULT_READING}-learned-s{seed}"):
                self.add(f"exp3-bce-on-{base}", "exp3", run_distill, needs=[base], base=base, loss="bce", k=k,
                         seed=seed)

    def _build_regime(self) -> None:
        """The regime study (regime.py): per cell of the protocol's grid, the conditions it trains, seed 0."""
        p = self.p
        for cell in regime.grid(p.name):
            for condition in cell.conditions:
                name = regime.unit_name(cell, condition)
                if name in self.units:
                    continue
                gate, mode, reading = regime.CONDITIONS[condition]
                routing = Routing(mode=mode, k=p.k) if reading is None else replace(
                    soft_gate_routing(reading, p.k), soft_temperature=1.0 / cell.scale)
                cfg = self.train_config(gate, routing, steps=round(p.steps * cell.steps), model=cell.model,
                                        train_fraction=cell.train_fraction)
                self.add(name, "regime", run_train, cfg=cfg, evals=[routing], cell=cell.name, condition=condition)

    def _build_block(self) -> None:
        """The block absorption ablation: end-to-end soft block gates, learned vs frozen random (the soft
        reading p.block_reading), a model trained under the oracle's block selection, dense; and a post-hoc KL
        block gate on the dense checkpoint beside the oracle and random block selections there."""
        p = self.p
        blocks = dict(block_size=p.block_size, block_k=p.block_k)
        steps = p.block_steps or p.steps
        soft = replace(soft_gate_routing(p.block_reading, p.k), mode="block-soft", **blocks)
        hard, oracle, rand = (Routing(mode=m, **blocks) for m in ("block-gate", "block-oracle", "block-random"))
        base = "dense"
        if steps != p.steps:  # the ablation's own dense baseline, trained as long as its other runs
            base = "block-dense"
            self.add(base, "block", run_train, cfg=self.train_config("none", Routing(), steps=steps), evals=[Routing()])
        self.add("block-on-dense", "block", run_eval, needs=[base], base=base, evals=[Routing(), oracle, rand])
        self.add("block-posthoc-kl", "block", run_block_distill, needs=[base], base=base, loss="kl")
        for seed in range(p.block_seeds or p.seeds):
            for gate in ("learned", "random"):
                self.add(f"block-soft-{gate}-s{seed}", "block", run_train,
                         cfg=self.train_config("none", soft, seed, block_gate=gate, steps=steps),
                         evals=[soft, hard, Routing()])
            self.add(f"block-oracle-s{seed}", "block", run_train,
                     cfg=self.train_config("none", oracle, seed, steps=steps), evals=[oracle, Routing()])

    # -------------------------------------------------------------------------------------------------------
    def group(self, unit: Unit) -> str:
        return unit.experiment

    def run_unit(self, unit: Unit) -> dict:
        return dict(unit.run(self, unit), experiment=unit.experiment, device=_device_name(self.device))

    def checkpoint(self, name: str) -> Path:
        """The checkpoint of training unit `name`, retraining it if this machine lacks it."""
        unit = self.units[name]
        train(unit.params["cfg"], self.runs / name, progress=self.progress)
        return self.runs / name / "checkpoint"

    def run_parallel(self, workers: list[str], only: list[str] | None = None, budget_s: float | None = None,
                     extra_args: list[str] = ()) -> dict:
        """Run the selected units that are not done as child processes, one per worker ("0", "1", ... GPU
        indices, or "cpu"), each unit as soon as the units it needs are done. Same skip and resume guarantees
        as `run` (each child is `gatelab reproduce --only UNIT`); one combined progress display; each child's
        output goes to <runs>/logs/UNIT.log."""
        t0 = time.time()
        selected = self.select(only)
        status = {u.name: "done (skipped)" for u in selected if self.is_done(u.name)}
        pending = [u for u in selected if u.name not in status]
        for u in pending:  # a dependency outside the selection that is not done yet must run first
            for need in u.needs:
                if not self.is_done(need) and need not in {x.name for x in pending}:
                    pending.insert(0, self.units[need])
        free, running, failed = list(workers), {}, set()
        logs = self.runs / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        bar = progress_bar(total=len(pending), desc=f"reproduce on {len(workers)} workers", unit="unit",
                           disable=not self.progress)
        try:
            while pending or running:
                for u in [u for u in pending if any(n in failed for n in u.needs)]:
                    pending.remove(u)
                    failed.add(u.name)
                    status[u.name] = "not started (a unit it needs failed)"
                    bar.update(1)
                over_budget = budget_s is not None and time.time() - t0 > budget_s
                while free and pending and not over_budget:
                    ready = next((u for u in pending if all(self.is_done(n) for n in u.needs)), None)
                    if ready is None:
                        break
                    pending.remove(ready)
                    worker = free.pop(0)
                    env = dict(os.environ, PYTHONUNBUFFERED="1")
                    device = self.device
                    if worker == "cpu":  # CPU workers share the cores instead of each taking all of them
                        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(workers))))
                    else:
                        env["CUDA_VISIBLE_DEVICES"] = worker
                        device = "cuda" if self.device in ("auto", "cuda") else self.device
                    cmd = [sys.executable, "-m", "gatelab", "reproduce", "--protocol", self.p.name, "--only",
                           ready.name, "--out", str(self.out), "--runs", str(self.runs), "--device", device,
                           "--no-report", "--quiet", *extra_args]
                    log = open(logs / f"{ready.name}.log", "w")
                    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            preexec_fn=_die_with_parent)
                    running[ready.name] = (proc, worker, time.time(), log)
                if over_budget:
                    for u in pending:
                        status[u.name] = "not started (budget)"
                        bar.update(1)
                    pending = []
                bar.set_postfix_str(" ".join(f"[{w}] {n}" for n, (_, w, _, _) in running.items()), refresh=True)
                time.sleep(0.2)
                for name, (proc, worker, start, log) in list(running.items()):
                    if proc.poll() is None:
                        continue
                    log.close()
                    del running[name]
                    free.append(worker)
                    if proc.returncode == 0 and self.is_done(name):
                        status[name] = f"ran in {time.time() - start:.0f} s on {_worker_label(worker)}"
                    else:
                        failed.add(name)
                        status[name] = f"FAILED (exit {proc.returncode}; see {logs / (name + '.log')})"
                    bar.update(1)
                    bar.write(f"[reproduce] {name}: {status[name]}")
        finally:
            for proc, *_ in running.values():
                proc.terminate()
            bar.close()
        return status


def output_folders(out: str | None, runs: str | None, name: str) -> tuple[Path, Path]:
    """(results, checkpoints) of a suite: results/NAME and runs/NAME by default; with only --out given, the
    checkpoints go to OUT/runs, so that one folder holds the whole reproduction."""
    if runs is None:
        runs = Path(out) / "runs" if out else Path("runs") / name
    return Path(out or Path("results") / name), Path(runs)


def make_suite(protocol: str, out: str | None = None, runs: str | None = None, seeds: int | None = None,
               steps: int | None = None, progress: bool = True, device: str = "auto") -> Suite:
    """The suite of a protocol, its corpus prepared. steps: override the protocol's end-to-end training steps (a
    quick look; results then differ from the protocol's, so use another --out)."""
    if protocol not in PROTOCOLS:
        raise GatelabError(f"unknown protocol {protocol!r}; choose {', '.join(PROTOCOLS)}")
    p = PROTOCOLS[protocol]
    if steps is not None:
        if steps < 1:
            raise GatelabError("--steps must be >= 1")
        p = replace(p, steps=steps, eval_every=min(p.eval_every, steps), warmup_steps=min(p.warmup_steps, steps // 10),
                    block_steps=None)
    if seeds is not None:
        if seeds < 1:
            raise GatelabError("--seeds must be >= 1")
        p = replace(p, seeds=seeds, block_seeds=None)
    if p.corpus == "bundled":
        prepare("bundled", p.data, progress=progress)
    elif not (Path(p.data) / "meta.json").is_file():
        raise GatelabError(f"protocol {protocol} needs {p.corpus} prepared in {p.data}: run "
                           f"`gatelab prepare --corpus {p.corpus} --source DIR` first")
    out, runs = output_folders(out, runs, protocol)
    return Suite(p, out, runs, progress=progress, device=device)


def unit_names(protocol: Protocol) -> list[str]:
    """The names of a protocol's units, in order (what its report counts), without running anything."""
    return list(Suite(protocol, "-", "-", progress=False).units)


def reproduce(protocol: str, out: str | None = None, runs: str | None = None, only: list[str] | None = None,
              seeds: int | None = None, progress: bool = True, device: str = "auto",
              budget_s: float | None = None, report: bool = True, gpus: str | int | None = None,
              steps: int | None = None, jobs_per_gpu: int = 1) -> dict:
    """Run the selected units that are not done (in this process, or over the workers of `gpus`), then the report."""
    suite = make_suite(protocol, out, runs, seeds=seeds, steps=steps, progress=progress, device=device)
    workers = workers_for(gpus, device, jobs_per_gpu)
    if workers:
        status = suite.run_parallel(workers, only, budget_s=budget_s,
                                    extra_args=(["--seeds", str(seeds)] if seeds is not None else []) +
                                    (["--steps", str(steps)] if steps is not None else []))
    else:
        status = suite.run(only, budget_s=budget_s)
    if report:
        write_report(suite.out, suite.p, list(suite.units))
    return status
