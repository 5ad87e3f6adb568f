"""Arguments of the commands that reproduce the paper: demo, reproduce (with its Slurm options) and report."""
from __future__ import annotations

import argparse

from gatelab.cli.arguments import NONNEG_INT, POS_FLOAT, POS_INT, csv_of, gpu_count, key_value
from gatelab.config import DEFAULT_POSITION, DEFAULT_READING, POSITIONS, READINGS

COMMANDS = "gatelab.cli.commands.reproduce"
PROTOCOLS = ("paper", "compact", "smoke")
SUITES = ("31m", "pretrained")


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the bundled corpus: train a small dense and a soft-gated "
                       "model, evaluate both under several routings, print a table (minutes on CPU)")
    p.add_argument("--out", default="runs/demo", help="the two runs' folder (default runs/demo): finished runs "
                   "there are reused, interrupted ones resume")
    p.add_argument("--steps", type=POS_INT, default=100, help="training steps per model (default 100)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=f"{COMMANDS}:run_demo")


def add_reproduce(sub) -> None:
    p = sub.add_parser("reproduce", help="every 31M-model experiment of the paper as resumable units, and a report")
    p.add_argument("--protocol", choices=PROTOCOLS, default="compact",
                   help="paper: the paper's settings on WikiText-103 (docs/method.md); compact: the bundled corpus (default); "
                        "smoke: a tiny model in minutes on CPU")
    p.add_argument("--only", type=csv_of(str), help="comma-separated units or experiments (exp1, exp2, exp3, exp4, "
                   "table4, table5, figure1, baseline, readings, block, regime, or unit-name prefixes)")
    p.add_argument("--suite", choices=SUITES, default="31m",
                   help="31m: the paper's 31M-model experiments (default); pretrained: Tables 6-9 and Figure 3 on a "
                        "Hugging Face causal LM given by --model/--gguf (protocols compact, smoke)")
    p.add_argument("--model", help="--suite pretrained: a local Hugging Face model folder (or the folder of --gguf)")
    p.add_argument("--gguf", help="--suite pretrained: a GGUF file inside --model, e.g. "
                   "SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--reading", default=DEFAULT_READING,
                   choices=tuple(READINGS),
                   help="--suite pretrained: the soft-gate reading of Tables 7-8 (units of another reading than the "
                        "default get its name as a suffix, and their own tables in the report)")
    p.add_argument("--position", choices=POSITIONS, help=f"--suite pretrained: the gate variant of the rerun Table "
                   f"6 units table6-VARIANT-* (default {DEFAULT_POSITION}); the pos-* units study every variant")
    p.add_argument("--max-steps", type=POS_INT, help="--suite pretrained: the step cap of the units trained until the "
                   "held-out objective stops improving (pos-*, table6-VARIANT-*; default: the protocol's, 800)")
    p.add_argument("--seeds", type=POS_INT, help="seeds for Experiment 1 and Table 5 (default: the protocol's, 3)")
    p.add_argument("--steps", type=POS_INT, help="override the end-to-end training steps of the protocol (a quick "
                   "look; write it to another --out)")
    p.add_argument("--out", help="results folder (default results/PROTOCOL, or results/pretrained)")
    p.add_argument("--runs", help="checkpoint folder (default OUT/runs when --out is given, else runs/PROTOCOL or "
                   "runs/pretrained; every folder named runs/ is kept out of git)")
    p.add_argument("--device", default="auto")
    p.add_argument("--budget-minutes", type=POS_FLOAT, help="start no new unit after this many minutes")
    p.add_argument("--gpus", type=gpu_count, default=None, help="run independent units concurrently, one process per "
                   "GPU: a number or 'all' visible GPUs (default 1: in this process); with --device cpu, that many CPU "
                   "processes, sharing the cores")
    p.add_argument("--jobs-per-gpu", type=POS_INT, default=1, help="units run concurrently on each GPU (default 1); "
                   "the 31M model's units leave most of an H100 idle, so 3-4 finish a sweep sooner")
    p.add_argument("--no-report", action="store_true", help="do not rebuild REPORT.md (gatelab report does)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--status", action="store_true", help="list the selected units as done, running, pending, failed "
                   "or not submitted (from the unit files and, for Slurm jobs, squeue), and run nothing")
    p.add_argument("--executor", choices=("local", "slurm"), default="local",
                   help="local: run here (default); slurm: one Slurm job per unit through submitit, dependencies "
                        "as job dependencies; a later call resubmits units whose job ended without a result")
    add_slurm_args(p)
    p.set_defaults(run=f"{COMMANDS}:run_reproduce")


def add_slurm_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Slurm (--executor slurm)")
    g.add_argument("--slurm-partition", metavar="P",
                   help="the partition of the jobs (default: the cluster's default partition)")
    g.add_argument("--slurm-gpus-per-job", metavar="N", type=NONNEG_INT,
                   help="GPUs of a training unit's job, one DDP rank each (default 1, 0 with --device cpu); other "
                        "units take one")
    g.add_argument("--slurm-tasks-per-job", metavar="N", type=POS_INT,
                   help="DDP ranks of a training unit's job (default: one per GPU; on CPU nodes, that many gloo ranks)")
    g.add_argument("--slurm-time", metavar="MIN", type=POS_INT,
                   help="time limit of each job in minutes (default 120); a job that reaches it is requeued and "
                        "resumes from its checkpoint")
    g.add_argument("--slurm-array-parallelism", metavar="N", type=POS_INT,
                   help="jobs of one array running at once (default 64)")
    g.add_argument("--slurm-param", metavar="KEY=VALUE", type=key_value, action="append",
                   help="a further sbatch option, repeatable: --slurm-param account=lab --slurm-param mem=32G")
    g.add_argument("--slurm-config", metavar="FILE",
                   help="a JSON or TOML file of these options (partition, gpus_per_job, tasks_per_job, time, "
                        "array_parallelism, params, setup: shell lines run before each job, poll_seconds); flags "
                        "override it")
    g.add_argument("--slurm-no-wait", action="store_true",
                   help="submit and return; the same command later waits and writes the report (or `gatelab report`)")


def add_report(sub) -> None:
    p = sub.add_parser("report", help="rebuild REPORT.md and plots from a reproduction's per-unit results")
    p.add_argument("--protocol", choices=PROTOCOLS, default="compact")
    p.add_argument("--suite", choices=SUITES, default="31m")
    p.add_argument("--out", help="results folder (default results/PROTOCOL)")
    p.set_defaults(run=f"{COMMANDS}:run_report")
