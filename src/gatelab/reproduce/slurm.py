"""`gatelab reproduce --executor slurm`: a suite's units as Slurm jobs, through submitit.

    gatelab reproduce --protocol compact --executor slurm --slurm-partition gpu --slurm-gpus-per-job 1 --slurm-time 120
    gatelab reproduce --protocol compact --status

Each job rebuilds the suite from a pickled recipe (the protocol as the submitter resolved it, absolute folders) and
runs its unit through `UnitSuite.run`, the local executor's code path: a finished unit is skipped, a killed one
resumes from its checkpoint. Units are submitted in waves: those whose dependencies are done or already in Slurm
go out together, one job array per set of dependency jobs, each array starting after those jobs succeeded
(`afterok`; a failed dependency cancels its dependents). Which job runs which unit is recorded in
RUNS/slurm/jobs.json: a later call leaves a unit alone while its job is pending or running, and resubmits it when
the job ended without a result (time limit, preemption, node failure, scancel). submitit requeues a job that
reaches its time limit or is preempted, and the unit resumes from its checkpoint. Logs: RUNS/slurm/logs/ (submitit's
folder; RUNS is OUT/runs when only --out is given), with RUNS/logs/UNIT.log linked to each unit's.

A training unit (end-to-end training, distillation) may take several GPUs: one job of --slurm-tasks-per-job tasks
(one per GPU) that submitit starts through srun, each a DistributedDataParallel rank (distributed.py); rank 0 writes
the unit's results.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import subprocess
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

from gatelab.attention.position_gates import DEFAULT_POSITION
from gatelab.config import GatelabError, read_config_file, write_json
from gatelab.progress import progress_bar
from gatelab.reproduce.pretrained import pretrained_suite
from gatelab.reproduce.report.compact import write_report
from gatelab.reproduce.report.pretrained import write_pretrained_report
from gatelab.reproduce.suite import Suite, UnitSuite, make_suite
from gatelab.reproduce.units import run_block_distill, run_distill, run_train

# Slurm job states in which a job may still run its unit
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING",
          "SIGNALING", "STAGE_OUT", "STOPPED", "SUSPENDED"}


RUNNING = {"CONFIGURING", "RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT"}


TRAINING = (run_train, run_distill, run_block_distill)  # the units that may train on several ranks


@dataclass
class SlurmOptions:
    partition: str | None = None
    gpus_per_job: int | None = None  # None: 1, or 0 with --device cpu
    tasks_per_job: int | None = None  # DDP ranks of a training unit; None: one per GPU
    time: int = 120  # minutes, per job
    array_parallelism: int = 64
    units_per_job: int = 1  # --jobs-per-gpu: units side by side in one job
    params: dict = field(default_factory=dict)  # further sbatch options: {"account": "lab", "mem": "32G"}
    setup: list = field(default_factory=list)  # shell lines run before the job (module load, source venv)
    poll_seconds: float = 10.0
    wait: bool = True

    def gpus(self, device: str) -> int:
        return self.gpus_per_job if self.gpus_per_job is not None else 0 if device == "cpu" else 1

    def ranks(self, device: str) -> int:
        return self.tasks_per_job or max(1, self.gpus(device))


def options_from(config: str | None = None, **flags) -> SlurmOptions:
    """The options of a config file (JSON or TOML, keys as SlurmOptions' fields) overridden by the flags given
    (None: not given), checked."""
    data = read_config_file(config) if config else {}
    known = [f.name for f in dataclasses.fields(SlurmOptions)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise GatelabError(f"{config}: unknown Slurm option(s) {', '.join(unknown)}; known: {', '.join(known)}")
    params = flags.pop("params", None) or {}
    data.update({k: v for k, v in flags.items() if v is not None})
    data["params"] = {**data.get("params", {}), **params}
    opts = SlurmOptions(**data)
    for name in ("gpus_per_job", "tasks_per_job", "time", "array_parallelism", "units_per_job"):
        value, low = getattr(opts, name), 0 if name == "gpus_per_job" else 1
        if value is not None and (type(value) is not int or value < low):
            raise GatelabError(f"Slurm option {name} must be an integer >= {low}, got {value!r}")
    if type(opts.poll_seconds) not in (int, float) or not opts.poll_seconds > 0:
        raise GatelabError(f"Slurm option poll_seconds must be a number > 0, got {opts.poll_seconds!r}")
    if not isinstance(opts.params, dict) or not all(isinstance(k, str) and k.strip() for k in opts.params):
        raise GatelabError(f"Slurm option params must map sbatch options to values, got {opts.params!r}")
    if not isinstance(opts.setup, list) or not all(isinstance(s, str) for s in opts.setup):
        raise GatelabError(f"Slurm option setup must be a list of shell lines, got {opts.setup!r}")
    taken = {"time", "partition", "ntasks-per-node", "gpus-per-node", "array", "dependency", "output", "error"}
    clash = sorted(k for k in opts.params if k.replace("_", "-") in taken)
    if clash:
        raise GatelabError(f"--slurm-param {clash[0]} is set by gatelab; use its own option (--slurm-time, "
                           f"--slurm-partition, --slurm-gpus-per-job, --slurm-tasks-per-job)")
    return opts


def _submitit():
    try:
        import submitit
    except ImportError:
        raise GatelabError("--executor slurm needs submitit: pip install 'gatelab[slurm]' (or submitit>=1.5)") from None
    return submitit


def _sbatch_flags(opts: SlurmOptions, gpus: int, ranks: int) -> dict:
    flags = dict(partition=opts.partition, time=opts.time, ntasks_per_node=ranks, gpus_per_node=gpus or None)
    flags = {k.replace("_", "-"): v for k, v in flags.items() if v is not None}
    return {**flags, **{k.replace("_", "-"): v for k, v in opts.params.items()}}


def check(opts: SlurmOptions, suite: UnitSuite, device: str) -> None:
    """Refuse what Slurm or the suite would refuse, before anything is submitted: Slurm's own verdict on the jobs'
    options comes from `sbatch --test-only`, which submits nothing."""
    _submitit()
    missing = [c for c in ("sbatch", "squeue", "srun") if shutil.which(c) is None]
    if missing:
        raise GatelabError(f"--executor slurm needs Slurm's {', '.join(missing)} on PATH (run it on a login node)")
    gpus, ranks = opts.gpus(device), opts.ranks(device)
    if gpus > 1 and ranks != gpus:
        raise GatelabError(f"--slurm-tasks-per-job {ranks} with --slurm-gpus-per-job {gpus}: a training unit runs "
                           f"one rank per GPU")
    if ranks > 1:
        if not isinstance(suite, Suite):
            raise GatelabError("the pretrained suite's units train on one device: --slurm-gpus-per-job and "
                               "--slurm-tasks-per-job must be 1")
        if opts.units_per_job > 1:
            raise GatelabError("--jobs-per-gpu shares a GPU between units; a unit over several GPUs takes them all")
        if suite.p.batch_size % ranks:
            raise GatelabError(f"the protocol's batch of {suite.p.batch_size} does not split over {ranks} ranks")
    flags = [f"--{k}={v}" for k, v in _sbatch_flags(opts, gpus, ranks).items()]
    r = subprocess.run(["sbatch", "--test-only", *flags, "--wrap", "true"], capture_output=True, text=True,
                       timeout=120)
    if r.returncode != 0:
        lines = [x for x in (r.stderr + r.stdout).splitlines() if x.strip()] or [f"exit status {r.returncode}"]
        said = next((x for x in reversed(lines) if "error" in x.lower()), lines[-1])
        raise GatelabError(f"Slurm refuses the job options ({' '.join(flags)}): {said.strip()}")


class UnitJob:
    """What one Slurm job runs: the suite rebuilt from its recipe, then each of `names` (several: side by side, one
    process each, sharing the job's GPU). Having a `checkpoint` method, it is requeued by submitit when the job
    reaches its time limit or is preempted; the unit then resumes from its checkpoint."""

    def __init__(self, build: Callable[[], UnitSuite], names: list[str], cwd: str):
        self.build, self.names, self.cwd = build, list(names), cwd

    def __call__(self) -> dict:
        os.chdir(self.cwd)
        if len(self.names) == 1:
            return {self.names[0]: run_in_job(self.build, self.names[0])}
        with multiprocessing.get_context("spawn").Pool(len(self.names)) as pool:
            return dict(zip(self.names, pool.starmap(run_in_job, [(self.build, n) for n in self.names])))

    def checkpoint(self, *args, **kwargs):
        return _submitit().helpers.DelayedSubmission(self, *args, **kwargs)


def run_in_job(build: Callable[[], UnitSuite], name: str) -> str:
    """Run one unit, as `gatelab reproduce --only NAME` would. In a job of several tasks each task is a DDP rank;
    rank 0 writes the unit's results, the others train beside it."""
    suite = build()
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        _submitit().helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        if os.environ["RANK"] != "0":
            if not suite.is_done(name):
                suite.run_unit(suite.units[name])
            return f"rank {os.environ['RANK']}"
    return suite.run(only=[name])[name]


def jobs_file(suite: UnitSuite) -> Path:
    return suite.runs / "slurm" / "jobs.json"


def read_jobs(suite: UnitSuite) -> dict:
    path = jobs_file(suite)
    return json.loads(path.read_text()) if path.is_file() else {}


def _needs(unit) -> list[str]:
    return list(getattr(unit, "needs", ()))


def _ranks_of(unit, opts: SlurmOptions, device: str) -> int:
    trains = getattr(unit, "run", None) in TRAINING and not unit.params.get("random_control")
    return opts.ranks(device) if trains else 1


def submit(suite: UnitSuite, build: Callable[[], UnitSuite], only: list[str] | None, opts: SlurmOptions,
           device: str) -> dict[str, str]:
    """Submit every selected unit that is not done and has no live job (with the units they need that are not
    done), wave after wave; the Slurm job of each unit not done, new or already there."""
    record = read_jobs(suite)
    live = squeue_states([r["job"] for r in record.values()])
    if live is None:  # without it, units whose jobs still run would be submitted twice
        raise GatelabError("squeue does not answer, so which recorded jobs still run is unknown; nothing submitted")
    todo = [u for u in suite.select(only) if not suite.is_done(u.name)]
    for u in list(todo):  # a dependency outside the selection that is not done must run first
        for need in _needs(u):
            if not suite.is_done(need) and need not in {x.name for x in todo}:
                todo.insert(0, suite.units[need])
    jobs = {u.name: record[u.name]["job"] for u in todo
            if u.name in record and live.get(record[u.name]["job"], ("",))[0] in ACTIVE}
    new = [u for u in todo if u.name not in jobs]
    while new:
        wave = [u for u in new if all(suite.is_done(n) or n in jobs for n in _needs(u))]
        if not wave:
            raise GatelabError(f"units {', '.join(u.name for u in new)} need units that are neither done nor selected")
        groups = defaultdict(list)
        for u in wave:
            after = tuple(sorted({jobs[n] for n in _needs(u) if n in jobs}))
            groups[after, _ranks_of(u, opts, device)].append(u.name)
        for (after, ranks), names in groups.items():
            for name, job in _submit_array(suite, build, names, after, ranks, opts, device).items():
                jobs[name] = job["job"]
                record[name] = job
            write_json(jobs_file(suite), record)
        new = [u for u in new if u.name not in jobs]
    return {u.name: jobs[u.name] for u in todo}


def _submit_array(suite: UnitSuite, build, names: list[str], after: tuple, ranks: int, opts: SlurmOptions,
                  device: str) -> dict[str, dict]:
    """One job array of `names` (opts.units_per_job to a job), started after the jobs `after` succeeded."""
    submitit = _submitit()
    folder = suite.runs / "slurm" / "logs"
    ex = submitit.SlurmExecutor(folder=folder)
    gpus = opts.gpus(device) if ranks > 1 else min(1, opts.gpus(device))
    extra = {"kill-on-invalid-dep": "yes", **{k.replace("_", "-"): v for k, v in opts.params.items()}}
    ex.update_parameters(job_name=f"gatelab-{suite.p.name}", time=opts.time, partition=opts.partition,
                         ntasks_per_node=ranks, gpus_per_node=gpus or None, array_parallelism=opts.array_parallelism,
                         stderr_to_stdout=True, setup=opts.setup or None, additional_parameters=extra,
                         dependency="afterok:" + ":".join(after) if after else None)
    per = 1 if ranks > 1 else opts.units_per_job
    work = [UnitJob(build, names[i:i + per], os.getcwd()) for i in range(0, len(names), per)]
    try:
        with ex.batch():
            handles = [ex.submit(w) for w in work]
    except Exception as e:  # noqa: BLE001 - sbatch refused: one line, what was submitted before is recorded
        raise GatelabError(f"sbatch failed: {' '.join(str(e).split())[:400]}") from None
    out = {}
    for w, h in zip(work, handles):
        log = Path(h.paths.stdout)
        for name in w.names:
            out[name] = dict(job=h.job_id, log=str(log), submitted=time.strftime("%Y-%m-%d %H:%M:%S"))
            link = suite.runs / "logs" / f"{name}.log"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.unlink(missing_ok=True)
            link.symlink_to(log)
    return out


def squeue_states(ids) -> dict[str, tuple[str, str]] | None:
    """{job id: (state, reason)} of the jobs Slurm still knows (finished ones for a few minutes); None when squeue
    fails."""
    ids = sorted(set(ids))
    if not ids:
        return {}
    try:
        r = subprocess.run(["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T|%r",
                            "--jobs=" + ",".join(ids)], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:  # every id forgotten ("Invalid job id specified"), or Slurm not answering
        return {} if "invalid job id" in r.stderr.lower() else None
    rows = [line.split("|") for line in r.stdout.splitlines() if line.count("|") == 2]
    return {job: (state, reason) for job, state, reason in rows}


def wait(suite: UnitSuite, jobs: dict[str, str], opts: SlurmOptions) -> dict[str, str]:
    """Poll Slurm and the unit files until every unit of `jobs` is done or its job ended; one progress bar."""
    record, status, suspect, misses = read_jobs(suite), {}, set(), 0
    bar = progress_bar(total=len(jobs), desc="reproduce on Slurm", unit="unit", disable=not suite.progress)
    try:
        while len(status) < len(jobs):
            live = squeue_states(jobs.values())
            misses = misses + 1 if live is None else 0
            if misses > 30:
                raise GatelabError("squeue has not answered for 30 polls; the jobs keep running: `gatelab "
                                   "reproduce --status` lists them, the same command again waits for them")
            for name, job in jobs.items():
                if name in status or live is None:
                    continue
                state = live.get(job, ("", ""))[0]
                if suite.is_done(name):
                    status[name] = f"ran as Slurm job {job}"
                elif state in ACTIVE:
                    continue
                elif any(status.get(n, "").startswith(("FAILED", "not started")) for n in _needs(suite.units[name])):
                    status[name] = "not started (a unit it needs failed)"
                elif name not in suspect:  # ended without a result: look again once (a slow shared file system)
                    suspect.add(name)
                    continue
                else:
                    status[name] = f"FAILED (Slurm job {job} {state or 'ended'}; see {record[name]['log']})"
                bar.update(1)
                bar.write(f"[reproduce] {name}: {status[name]}")
            states = Counter(live.get(j, ("",))[0] for n, j in jobs.items() if n not in status) if live else {}
            bar.set_postfix_str(f"{sum(states[s] for s in RUNNING)} running, {states['PENDING']} pending",
                                refresh=True)
            if len(status) < len(jobs):
                time.sleep(opts.poll_seconds)
    except KeyboardInterrupt:
        bar.write("[reproduce] stopped waiting; the jobs keep running: `gatelab reproduce --status` (same options) "
                  "lists them, the same command again waits for them and writes the report")
        raise
    finally:
        bar.close()
    return status


def unit_states(suite: UnitSuite, only: list[str] | None) -> list[tuple[str, str, str]]:
    """(unit, state, detail) of the selected units: done, running, pending, failed (its job ended without a
    result; the next call resubmits it) or not submitted, from the unit files, RUNS/slurm/jobs.json and squeue."""
    record = read_jobs(suite)
    live = squeue_states([r["job"] for r in record.values()]) if record and shutil.which("squeue") else {}
    rows = []
    for u in suite.select(only):
        r = record.get(u.name)
        job = r["job"] if r else None
        state, reason = (live or {}).get(job, ("", ""))
        if suite.is_done(u.name):
            rows.append((u.name, "done", f"Slurm job {job}" if job else ""))
        elif job and state in ACTIVE:
            kind = "running" if state in RUNNING else "pending"
            rows.append((u.name, kind, f"Slurm job {job} {state}" + (f" ({reason})" if reason not in ("", "None")
                                                                      else "") + f"; log {r['log']}"))
        elif job:
            ended = state or ("unknown to squeue" if live is not None else "squeue did not answer")
            rows.append((u.name, "failed", f"Slurm job {job} {ended}; log {r['log']}"))
        else:
            rows.append((u.name, "not submitted", ""))
        if rows[-1][1] in ("failed", "not submitted") and (suite.runs / u.name / "checkpoint").exists():
            rows[-1] = rows[-1][:2] + ((rows[-1][2] + "; " if rows[-1][2] else "") + "resumes from its checkpoint",)
    return rows


def print_states(suite: UnitSuite, only: list[str] | None) -> None:
    rows = unit_states(suite, only)
    for name, state, detail in rows:
        print(f"{name:40s} {state:14s} {detail}".rstrip())
    counts = Counter(state for _, state, _ in rows)
    print(", ".join(f"{counts[s]} {s}" for s in ("done", "running", "pending", "failed", "not submitted")))


def suite_from_args(args) -> tuple[UnitSuite, Callable[[], UnitSuite], Callable[[], object]]:
    """The suite of `gatelab reproduce`'s arguments, a picklable recipe that rebuilds it inside a job, and its
    report."""
    if args.suite == "pretrained":
        kw = dict(model_path=str(Path(args.model).resolve()), gguf=args.gguf, protocol=args.protocol,
                  out=args.out, runs=args.runs, device=args.device, task_steps=args.steps, reading=args.reading,
                  position=args.position or DEFAULT_POSITION, max_steps=args.max_steps)
        suite = pretrained_suite(**kw, progress=not args.quiet)
        kw.update(out=str(suite.out.resolve()), runs=str(suite.runs.resolve()))
        return suite, partial(pretrained_suite, **kw), partial(write_pretrained_report, suite.out, suite.p)
    suite = make_suite(args.protocol, args.out, args.runs, seeds=args.seeds, steps=args.steps,
                       progress=not args.quiet, device=args.device)
    build = partial(Suite, suite.p, suite.out.resolve(), suite.runs.resolve(), device=args.device)
    return suite, build, partial(write_report, suite.out, suite.p, list(suite.units))


def reproduce_on_slurm(args) -> dict | None:
    """`gatelab reproduce --executor slurm`: check, submit, wait (unless --slurm-no-wait), write the report; with
    --status, list the units' states instead (None)."""
    opts = None
    if args.executor == "slurm":
        for flag, value in (("--gpus", args.gpus), ("--budget-minutes", args.budget_minutes)):
            if value is not None:
                raise GatelabError(f"{flag} applies to --executor local (Slurm: --slurm-gpus-per-job, --slurm-time)")
        opts = options_from(args.slurm_config, partition=args.slurm_partition, gpus_per_job=args.slurm_gpus_per_job,
                            tasks_per_job=args.slurm_tasks_per_job, time=args.slurm_time,
                            array_parallelism=args.slurm_array_parallelism, params=dict(args.slurm_param or []),
                            units_per_job=args.jobs_per_gpu if args.jobs_per_gpu != 1 else None,
                            wait=False if args.slurm_no_wait else None)
        _submitit()
    suite, build, report = suite_from_args(args)
    if args.status:
        print_states(suite, args.only)
        return None
    check(opts, suite, args.device)
    status = {u.name: "done (skipped)" for u in suite.select(args.only) if suite.is_done(u.name)}
    jobs = submit(suite, build, args.only, opts, args.device)
    if not opts.wait:
        return {**status, **{n: f"submitted as Slurm job {j}" for n, j in jobs.items()}}
    status.update(wait(suite, jobs, opts))
    if not args.no_report:
        report()
    return status
