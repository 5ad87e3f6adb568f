"""The commands that reproduce the paper: demo (the small end-to-end job), reproduce (every experiment as
resumable units, here or on Slurm) and report (REPORT.md rebuilt from the units' results)."""
from __future__ import annotations

from gatelab.config import DEFAULT_POSITION, GatelabError
from gatelab.reproduce.demo import run_demo as demo
from gatelab.reproduce.pretrained import reproduce_pretrained
from gatelab.reproduce.pretrained_protocols import PROTOCOLS as PRETRAINED_PROTOCOLS
from gatelab.reproduce.report.compact import write_report
from gatelab.reproduce.report.pretrained import write_pretrained_report
from gatelab.reproduce.slurm import reproduce_on_slurm
from gatelab.reproduce.suite import PROTOCOLS, Suite, reproduce


def run_demo(args) -> None:
    table = demo(args.out, steps=args.steps, progress=not args.quiet)
    print(table)


def run_reproduce(args) -> None:
    _check_reproduce_args(args)
    if args.executor == "slurm" or args.status:
        status = reproduce_on_slurm(args)
        if status is None:
            return
        default_out = "results/" + ("pretrained" if args.suite == "pretrained" else args.protocol)
    elif args.suite == "pretrained":
        status, default_out = _reproduce_pretrained(args), "results/pretrained"
    else:
        status = reproduce(args.protocol, out=args.out, runs=args.runs, only=args.only, seeds=args.seeds,
                           progress=not args.quiet, device=args.device, budget_s=_budget_s(args),
                           report=not args.no_report, gpus=args.gpus, steps=args.steps,
                           jobs_per_gpu=args.jobs_per_gpu)
        default_out = "results/" + args.protocol
    for name, state in status.items():
        print(f"{name:40s} {state}")
    if not args.no_report and not args.slurm_no_wait:
        print(f"report: {args.out or default_out}/REPORT.md")
    if any(state.startswith(("FAILED", "not started (a unit")) for state in status.values()):
        raise GatelabError("some units failed; their logs are named above")


def _check_reproduce_args(args) -> None:
    """Refuse flags that do not apply to the chosen executor and suite."""
    slurm_flags = [k for k, v in vars(args).items() if k.startswith("slurm_") and v not in (None, False)]
    if args.executor == "local" and slurm_flags:
        raise GatelabError(f"--{slurm_flags[0].replace('_', '-')} applies to --executor slurm")
    if args.suite == "pretrained" and not args.model:
        raise GatelabError("--suite pretrained needs --model (a local Hugging Face folder, or the folder of --gguf)")
    if args.suite != "pretrained" and (args.position or args.max_steps):
        raise GatelabError("--position and --max-steps apply to --suite pretrained")


def _budget_s(args) -> float | None:
    return args.budget_minutes * 60 if args.budget_minutes else None


def _reproduce_pretrained(args) -> dict:
    """--suite pretrained, here: Tables 6-9 and Figure 3 on one device."""
    if args.protocol == "paper" or args.gpus not in (None, "1") or args.jobs_per_gpu != 1:
        raise GatelabError("--suite pretrained supports --protocol compact or smoke on one device")
    return reproduce_pretrained(args.model, args.gguf, args.protocol, out=args.out, runs=args.runs,
                                only=args.only, device=args.device, progress=not args.quiet,
                                budget_s=_budget_s(args), task_steps=args.steps, reading=args.reading,
                                report=not args.no_report, position=args.position or DEFAULT_POSITION,
                                max_steps=args.max_steps)


def run_report(args) -> None:
    if args.suite == "pretrained":
        print(f"wrote {write_pretrained_report(args.out or 'results/pretrained', PRETRAINED_PROTOCOLS[args.protocol])}")
        return
    out = args.out or f"results/{args.protocol}"
    protocol = PROTOCOLS[args.protocol]
    units = list(Suite(protocol, "-", "-", progress=False).units)
    print(f"wrote {write_report(out, protocol, units)}")
