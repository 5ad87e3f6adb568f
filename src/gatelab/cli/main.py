"""The `gatelab` command line. Each subcommand has --help; user errors print one line and exit 2."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from gatelab.config import (
    ALL_ROUTING_MODES, BLOCK_MODES, BLOCK_POOLS, DEFAULT_POSITION, DEFAULT_READING, POSITION_HELP, POSITIONS, READINGS,
    SOFT_MASKS, GatelabError, Routing, check_writable, load_train_config, soft_gate_routing, write_json
)
from gatelab.progress import keep_freed_memory
from gatelab.reproduce.report.compact import format_table


class Parser(argparse.ArgumentParser):
    """argparse, with the one-line error of every other user error: `gatelab: error: ...`, exit status 2."""

    def error(self, message: str):
        where = self.prog.removeprefix("gatelab").strip()
        print(f"gatelab: error: {where + ': ' if where else ''}{message} (see `{self.prog} --help`)",
              file=sys.stderr)
        sys.exit(2)


def _number(kind, lo=None, lo_open=False):
    """An argparse type: an int or float, optionally >= lo (> lo when lo_open)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if lo is not None and (value <= lo if lo_open else value < lo):
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo}, got {text}")
        return value
    return parse


POS_INT, NONNEG_INT, POS_FLOAT = _number(int, 1), _number(int, 0), _number(float, 0, lo_open=True)


NONNEG_FLOAT = _number(float, 0)


def _csv(kind):
    def parse(text: str):
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        try:
            return [kind(x) for x in items]
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of "
                                             f"{'integers' if kind in (int, POS_INT, NONNEG_INT) else 'names'}"
                                             f"{' >= 1' if kind is POS_INT else ' >= 0' if kind is NONNEG_INT else ''}"
                                             f", got {text!r}") from None
    return parse


def _gpus(text: str):
    if text == "all":
        return text
    try:
        return str(POS_INT(text))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a number of GPUs >= 1 or 'all', got {text!r}") from None


REFERENCE_OVERRIDES = ["compile=false", "fused_loss=false"]  # --reference: the plain eager path


def add_reference_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reference", action="store_true",
                   help="plain reference path: no torch.compile, unfused output-head loss (same results to float "
                        "rounding, slower)")


def add_routing_args(p: argparse.ArgumentParser, modes_default: str = "dense") -> None:
    p.add_argument("--routing", type=_csv(str), default=[modes_default],
                   help=f"comma-separated routing modes: {', '.join(ALL_ROUTING_MODES)} (default {modes_default})")
    p.add_argument("--k", type=_csv(int), default=None,
                   help="comma-separated k values for the top-k and soft-gate routings (default 64; an error with "
                        "dense routing alone, which uses no k)")
    p.add_argument("--reading", choices=tuple(READINGS), default=DEFAULT_READING,
                   help=f"soft-gate reading (default {DEFAULT_READING}: chosen by the reading study, README)")
    p.add_argument("--soft-mask", choices=SOFT_MASKS, default=None, help="soft-gate mask, overriding --reading's")
    p.add_argument("--soft-temperature", type=POS_FLOAT, default=1.0)
    p.add_argument("--soft-renormalize", action="store_true", help="soft-gate: renormalise A*m per row (overriding "
                   "--reading's choice)")
    p.add_argument("--random-seed", type=NONNEG_INT, default=0, help="seed of random-topk's fixed subsets")
    p.add_argument("--block-size", type=POS_INT, help="block routings: tokens per block (default: the block gate's "
                   "own, else 64)")
    p.add_argument("--block-k", type=_csv(POS_INT), default=[4], help="block routings: comma-separated numbers of "
                   "earlier key blocks kept per query block besides the diagonal (default 4)")


def add_block_gate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--block-size", type=POS_INT, help="train a block gate instead: tokens per block (e.g. 128); its "
                   "loss is kl (against each block row's pooled attention mass) or bce (against the oracle blocks)")
    p.add_argument("--block-k", type=POS_INT, default=8, help="block gate: earlier key blocks kept per query block, for "
                   "the F1 it logs and the bce target (default 8)")
    p.add_argument("--block-pool", choices=BLOCK_POOLS, default="mean",
                   help="block gate key pooling: mean, or max-min (SeerAttention's; default mean)")


def routings_from_args(args, context: int, block_size: int | None = None) -> list[Routing]:
    """The routings of --routing x --k (token modes) or x --block-k (block modes). block_size: the default block
    size when --block-size is not given (a loaded block gate's own)."""
    if args.k is not None and all(mode == "dense" for mode in args.routing):
        raise GatelabError(f"--k {','.join(map(str, args.k))} is unused: dense routing keeps every key; give a "
                           f"top-k or soft-gate routing too (e.g. --routing dense,oracle-topk) or drop --k")
    ks_given = args.k if args.k is not None else [Routing.k]
    out = []
    bs = getattr(args, "block_size", None) or block_size or Routing.block_size
    for mode in args.routing:
        block = mode in BLOCK_MODES
        ks = [Routing.k] if mode == "dense" else args.block_k if block else ks_given
        for k in ks:
            reading = READINGS[args.reading]
            r = Routing(mode=mode, k=Routing.k if block else k, soft_mask=args.soft_mask or reading["soft_mask"],
                        soft_temperature=args.soft_temperature,
                        soft_renormalize=args.soft_renormalize or reading["soft_renormalize"], seed=args.random_seed,
                        **(dict(block_size=bs, block_k=k) if block else {}))
            out.append(r.validate(context))
    return out


def _gate_block_size(path) -> int | None:
    """The block size a saved block gate was distilled at (None for token gates)."""
    if not path:
        return None
    folder = Path(path).parent if Path(path).is_file() else Path(path)
    meta = folder / "gate.json"
    if not meta.is_file():
        return None
    data = json.loads(meta.read_text())
    return data.get("block_size") if data.get("gate_type") == "block" or "block" in data.get("format", "") else None


# ----------------------------------------------------------------------------------------------------------
def cmd_info(args) -> None:
    from gatelab.model import GPT
    cfg = load_train_config(args.config, args.overrides)
    if cfg.model.gate == "none":
        cfg.model.gate = "learned"  # count the gate too
    model = GPT(cfg.model)
    dense, gate = model.num_params(), model.num_params(gates=True)
    print(format_table([dict(part="model (dense)", parameters=f"{dense:,}"),
                        dict(part=f"gates (d_gate {cfg.model.d_gate})", parameters=f"{gate:,}"),
                        dict(part="gates / model", parameters=f"{100 * gate / dense:.2f}%")],
                       ["part", "parameters"]))
    print(json.dumps(dict(model=cfg.model.__dict__), indent=1))


def cmd_prepare(args) -> None:
    from gatelab.data import prepare, prepared_folder
    if args.out and args.name:
        raise GatelabError("give --out DIR or --name NAME, not both")
    out = args.out or str(prepared_folder(args.corpus, args.source, args.name))
    meta = prepare(args.corpus, out, source=args.source, context=args.context, force=args.force,
                   progress=not args.quiet)
    cut = " (cut by tokens: too few or too long documents to split by document)" if meta.get("split_by") == \
        "tokens" else ""
    print(f"prepared {args.corpus} in {out}: " + ", ".join(f"{k} {v:,} tokens" for k, v in meta["tokens"].items())
          + cut + f"; fingerprint {meta['fingerprint']['id']} (train on it with data={out})")


def cmd_train(args) -> None:
    cfg = load_train_config(args.config, list(args.overrides) + (REFERENCE_OVERRIDES if args.reference else []))
    resume = "require" if args.resume else "never" if args.fresh else "auto"
    print_summary(train_under_torchrun(cfg, args.out, resume=resume, progress=not args.quiet), args.out)


def train_under_torchrun(cfg, out, **kw) -> dict:
    """train(), leaving torchrun's process group (if any) cleanly; only rank 0 prints the summary."""
    import os

    from gatelab.training import distributed
    from gatelab.training.train import train
    try:
        summary = train(cfg, out, **kw)
    finally:
        distributed.cleanup()
    return summary if os.environ.get("RANK", "0") == "0" else dict(summary, quiet_rank=True)


def print_summary(summary: dict, out: str) -> None:
    if summary.get("quiet_rank"):
        return
    if summary.get("skipped"):
        print(f"{out} is already finished (use --fresh to start over)")
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1))


def load_for_evaluation(args):
    """The checkpoint's model on the chosen device, with --gate attached when given (its gate.json in
    args.gate_meta, else None)."""
    from gatelab.devices import resolve_device
    from gatelab.training.checkpoint import load_model
    device = resolve_device(args.device)
    model, trainer = load_model(args.checkpoint, device=device)
    args.gate_meta = None
    if args.gate:
        from gatelab.training.gate_files import attach_gate
        args.gate_meta = attach_gate(model, args.gate, args.checkpoint, allow_other_base=args.allow_other_base)
    return model, trainer, device


def load_checked_data(args, trainer: dict):
    """--data (default: the checkpoint's training data) at --split, refused unless it is the data the checkpoint
    and --gate were trained on (their recorded fingerprints; --allow-other-data: a warning instead)."""
    from gatelab.data import TokenData, check_same_data
    data = TokenData(args.data or trainer["config"]["data"], args.split)
    check_same_data(trainer.get("data_fingerprint"), data, f"checkpoint {args.checkpoint}", args.allow_other_data)
    if getattr(args, "gate_meta", None):
        check_same_data(args.gate_meta.get("data_fingerprint"), data, f"gate {args.gate}", args.allow_other_data)
    return data


def finite_result(res: dict, what: str) -> dict:
    """An evaluation result, refused when its perplexity is not a finite number (a damaged model, an overflow)."""
    if not (math.isfinite(res["nll"]) and math.isfinite(res["ppl"])):
        raise GatelabError(f"{what}: the evaluation gave a non-finite loss ({res['nll']}): the model's outputs are "
                           f"not finite numbers, so there is no perplexity to report")
    return res


def add_other_data_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-other-data", action="store_true", help="use --data even though its fingerprint differs "
                   "from the data the checkpoint (or gate) was trained on (a warning instead of an error)")


def cmd_eval(args) -> None:
    import torch

    from gatelab.diagnostics.evaluate import perplexity
    model, trainer, device = load_for_evaluation(args)
    data = load_checked_data(args, trainer)
    data_dir = data.folder
    rows = []
    torch.manual_seed(args.seed)
    for routing in routings_from_args(args, model.cfg.context, _gate_block_size(args.gate)):
        if routing.needs_gate and not model.gates():
            raise GatelabError(f"--routing {routing.mode} needs a gate: this checkpoint has none; pass --gate GATE")
        if routing.needs_block_gate and not model.block_gates():
            raise GatelabError(f"--routing {routing.mode} needs a block gate: this checkpoint has none; pass --gate "
                               f"GATE (from `gatelab distill --block-size ...`)")
        res = finite_result(perplexity(model, data, routing, args.batch_size, args.max_tokens,
                                       progress=not args.quiet, desc=routing.label()),
                            f"{args.checkpoint} under {routing.label()}")
        rows.append(dict(routing=routing.mode, k=None if routing.mode == "dense" else
                         routing.block_k if routing.is_block else routing.k,
                         block_size=routing.block_size if routing.is_block else None,
                         label=routing.label(), ppl=res["ppl"], nll=res["nll"], tokens=res["tokens"]))
        if not args.quiet:
            print(f"{routing.label():40s} ppl {res['ppl']:.3f}", file=sys.stderr)
    block = any(r["block_size"] for r in rows)
    print(format_table(rows, ["routing", "k"] + (["block_size"] if block else []) + ["ppl", "nll", "tokens"]))
    if args.json:
        write_json(args.json, dict(checkpoint=str(args.checkpoint), gate=args.gate, split=args.split,
                                   data=str(data_dir), data_fingerprint=data.fingerprint["id"], device=str(device),
                                   results=rows))


def cmd_distill(args) -> None:
    from gatelab.config import apply_overrides, to_dict, train_config_from_dict
    from gatelab.training.distill import distill_config
    block = (Routing(mode="block-gate", block_size=args.block_size, block_k=args.block_k)
             if args.block_size else None)
    cfg = distill_config(args.checkpoint, args.loss, k=args.k, d_gate=args.d_gate, steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, seed=args.seed, random_control=args.random_control,
                         data=args.data, reading=args.reading, block=block, block_pool=args.block_pool,
                         allow_other_data=args.allow_other_data)
    cfg = train_config_from_dict(apply_overrides(to_dict(cfg), list(args.overrides) +
                                                 (REFERENCE_OVERRIDES if args.reference else []))).validate()
    if args.random_control:  # nothing trains: export the frozen random gate of the same initialisation
        from gatelab.devices import resolve_device
        from gatelab.training.gate_files import export_random_control
        print(f"frozen random gate written to {export_random_control(cfg, args.out, resolve_device(cfg.device))}")
        return
    print_summary(train_under_torchrun(cfg, args.out, resume="never" if args.fresh else "auto",
                                       progress=not args.quiet), args.out)


def cmd_analyze(args) -> None:
    from gatelab.diagnostics.analyze import analyze, ensure_gate
    model, trainer, _ = load_for_evaluation(args)
    data = load_checked_data(args, trainer)
    note = f"gate {args.gate}" if args.gate else ensure_gate(model, args.seed)
    for k in args.k:
        Routing(mode="oracle-topk", k=k).validate(model.cfg.context)
    out = args.out or str(Path(args.checkpoint).parent / "analysis")
    res = analyze(model, data, args.k, out, batches=args.batches, batch_size=args.batch_size,
                  title=str(args.checkpoint), gate_note=note)
    print((Path(out) / "analysis.md").read_text())
    print(f"wrote {out}/analysis.json, analysis.md, concentration.png ({res['rows']:,} query rows)")


def cmd_audit(args) -> None:
    from gatelab.diagnostics.analyze import audit
    if args.model:  # a Hugging Face model with gates saved by hf-distill
        from gatelab.devices import resolve_device
        from gatelab.hf.audit import hf_audit
        from gatelab.hf.corpus import encode_corpus
        from gatelab.hf.gate_files import load_pretrained
        if args.control:
            raise GatelabError("--control compares gatelab checkpoints; it does not apply to --model")
        if not args.gate or args.checkpoint:
            raise GatelabError("audit --model DIR needs --gate GATES (saved by gatelab hf-distill) and no checkpoint")
        model, tok = load_pretrained(args.model, args.gguf, device=resolve_device(args.device))
        ids = encode_corpus(tok, "bundled", args.split, progress=True)
        res = hf_audit(model, args.gate, ids, args.k, max_tokens=args.max_tokens,
                       allow_other_base=args.allow_other_base, progress=True, position=args.position)
        print(f"gate variant: {res['position']}", file=sys.stderr)
        _print_audit(res, args)
        return
    if args.position:
        raise GatelabError("--position applies to --model (Hugging Face gates)")
    if not args.checkpoint:
        raise GatelabError("audit needs a gatelab checkpoint (RUN/checkpoint), or --model DIR --gate GATES")
    model, trainer, _ = load_for_evaluation(args)
    Routing(mode="gate-topk", k=args.k).validate(model.cfg.context)
    meta = args.gate_meta
    data = load_checked_data(args, trainer)
    control = None
    if args.control:
        from gatelab.data import check_same_data
        from gatelab.training.checkpoint import load_model
        control, control_trainer = load_model(args.control, device=next(model.parameters()).device)
        check_same_data(control_trainer.get("data_fingerprint"), data, f"control {args.control}",
                        args.allow_other_data)
    res = audit(model, trainer, data, args.k, gate_meta=meta, max_tokens=args.max_tokens, control=control)
    _print_audit(res, args)


def _better(gain: float) -> str:
    """'+17.3% better' / '361.4% worse' for a relative perplexity gain."""
    return f"{100 * gain:.1f}% better" if gain >= 0 else f"{-100 * gain:.1f}% worse"


def _gap_words(s: dict) -> str:
    """What the audit can say about the share of the random-to-oracle gap the learned gate closes."""
    closed = s.get("random_to_oracle_gap_closed")
    if closed is not None:
        if closed > 1:
            return f"; it does better than the oracle top-k (closes {100 * closed:.1f}% of the random-to-oracle gap)"
        return f" and closes {100 * closed:.1f}% of the random-to-oracle gap"
    if "oracle_vs_random" in s:
        from gatelab.diagnostics.analyze import MIN_ORACLE_GAIN
        return (f"; the oracle top-k is only {_better(s['oracle_vs_random'])} than the random gate, under the "
                f"{100 * MIN_ORACLE_GAIN:g}% needed: the random-to-oracle gap is too small to measure a share of it")
    return ""


def _print_audit(res: dict, args) -> None:
    print(format_table(res["rows"], ["model", "routing", "ppl"]))
    s = res["summary"]
    print(f"\nhard top-{args.k}: the learned gate is {_better(s['learned_vs_random'])} than a frozen random "
          f"gate of the same form" + _gap_words(s))
    if "soft_learned_vs_random" in s:
        print(f"under its training routing: {_better(s['soft_learned_vs_random'])} than random")
    for routing, gain in s.get("learned_vs_control", {}).items():
        print(f"{routing}: the learned-gate model is {_better(gain)} than the control trained with a "
              f"frozen random gate")
    if args.json:
        write_json(args.json, dict(checkpoint=args.checkpoint and str(args.checkpoint), model=args.model,
                                   gate=args.gate, control=getattr(args, "control", None), **res))


def cmd_hf_eval(args) -> None:
    from gatelab.devices import resolve_device
    from gatelab.hf.adapter import attach_gates
    from gatelab.hf.corpus import encode_corpus
    from gatelab.hf.evaluate import hf_perplexity
    from gatelab.hf.gate_files import load_pretrained
    model, tok = load_pretrained(args.model, args.gguf, device=resolve_device(args.device))
    if args.long_docs:
        from gatelab.hf.corpus import encode_long_documents
        docs = encode_long_documents(tok, args.context, args.corpus, args.split, args.source)
    else:
        ids = encode_corpus(tok, args.corpus, args.split, args.source, context=args.context, progress=not args.quiet)
    routings = routings_from_args(args, args.context, _gate_block_size(args.gate))
    if args.gate:
        from gatelab.hf.gate_files import load_gates
        load_gates(model, args.gate, allow_other_base=args.allow_other_base, position=args.position)
    elif args.position:
        raise GatelabError("--position checks the variant of --gate GATES; there is no --gate")
    elif any(r.mode != "dense" for r in routings):
        attach_gates(model, gate="none")
    rows = []
    for r in routings:
        if args.long_docs:
            from gatelab.hf.evaluate import hf_perplexity_docs
            res = hf_perplexity_docs(model, docs, r, args.context, batch_size=args.batch_size,
                                     max_tokens=args.max_tokens, progress=not args.quiet)
        else:
            res = hf_perplexity(model, ids, r, context=args.context, batch_size=args.batch_size,
                                max_tokens=args.max_tokens, progress=not args.quiet)
        finite_result(res, f"{args.model} under {r.label()}")
        block = r.is_block
        rows.append(dict(routing=r.mode, k=None if r.mode == "dense" else r.block_k if block else r.k,
                         block_size=r.block_size if block else None, label=r.label(), ppl=res["ppl"], nll=res["nll"],
                         tokens=res["tokens"]))
        if not args.quiet:
            print(f"{r.label():40s} ppl {res['ppl']:.3f}", file=sys.stderr)
    print(format_table(rows, ["routing", "k", "block_size", "ppl", "nll", "tokens"]))
    if args.json:
        import torch
        dev = next(model.parameters()).device
        write_json(args.json, dict(model=str(args.model), gguf=args.gguf, gate=args.gate, corpus=args.corpus,
                                   split=args.split, context=args.context, long_docs=args.long_docs, device=str(dev),
                                   device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                                   command="gatelab " + " ".join(sys.argv[1:]), results=rows))


def cmd_hf_distill(args) -> None:
    from gatelab.devices import resolve_device
    from gatelab.hf.adapter import attach_gates, set_trainable
    from gatelab.hf.corpus import encode_corpus
    from gatelab.hf.distill import train_gates
    from gatelab.hf.gate_files import load_pretrained
    model, tok = load_pretrained(args.model, args.gguf, device=resolve_device(args.device))
    if args.long_docs:  # the train split's documents longer than the context, concatenated
        from gatelab.hf.corpus import encode_long_documents
        ids = [t for doc in encode_long_documents(tok, args.context, args.corpus, "train", args.source) for t in doc]
    else:
        ids = encode_corpus(tok, args.corpus, "train", args.source, context=args.context, progress=not args.quiet)
    k = args.k
    if args.block_size:  # block gates, distilled against each layer's pooled attention mass
        from gatelab.hf.adapter import attach_block_gates
        if args.loss == "task":
            raise GatelabError("block gates distil with --loss kl or bce")
        from gatelab.hf.adapter import DEFAULT_BLOCK_POSITION
        position = args.position or DEFAULT_BLOCK_POSITION
        attach_block_gates(model, d_gate=args.d_gate, gate="learned", pool=args.block_pool,
                           block_size=args.block_size, seed=args.seed, position=position)
        k = args.block_k
    else:
        position = args.position or DEFAULT_POSITION
        attach_gates(model, d_gate=args.d_gate, gate="learned", seed=args.seed, position=position)
    unfrozen = set_trainable(model, layers=args.unfreeze_layers or [])
    print(f"training: {', '.join(unfrozen)} ({position} gates)", file=sys.stderr)
    soft = soft_gate_routing(args.reading, args.k)
    summary = train_gates(model, ids, args.out, loss=args.loss, k=k, steps=args.steps, batch_size=args.batch_size,
                          context=args.context, lr=args.lr, seed=args.seed, progress=not args.quiet,
                          soft_routing=soft, eval_every=args.eval_every, patience=args.patience,
                          min_delta=args.min_delta, eval_batches=args.eval_batches, step_f1=not args.no_step_f1)
    print_summary(summary, args.out)


def cmd_reproduce(args) -> None:
    from gatelab.reproduce.suite import reproduce
    budget_s = args.budget_minutes * 60 if args.budget_minutes else None
    slurm_flags = [k for k, v in vars(args).items() if k.startswith("slurm_") and v not in (None, False)]
    if args.executor == "local" and slurm_flags:
        raise GatelabError(f"--{slurm_flags[0].replace('_', '-')} applies to --executor slurm")
    if args.suite == "pretrained" and not args.model:
        raise GatelabError("--suite pretrained needs --model (a local Hugging Face folder, or the folder of --gguf)")
    if args.suite != "pretrained" and (args.position or args.max_steps):
        raise GatelabError("--position and --max-steps apply to --suite pretrained")
    if args.executor == "slurm" or args.status:
        from gatelab.reproduce.slurm import reproduce_on_slurm  # here: slurm.py imports reproduce.py
        status = reproduce_on_slurm(args)
        if status is None:
            return
        default_out = "results/" + ("pretrained" if args.suite == "pretrained" else args.protocol)
    elif args.suite == "pretrained":
        from gatelab.reproduce.pretrained import reproduce_pretrained
        if args.protocol == "paper" or args.gpus not in (None, "1") or args.jobs_per_gpu != 1:
            raise GatelabError("--suite pretrained supports --protocol compact or smoke on one device")
        status = reproduce_pretrained(args.model, args.gguf, args.protocol, out=args.out, runs=args.runs,
                                      only=args.only, device=args.device, progress=not args.quiet,
                                      budget_s=budget_s, task_steps=args.steps, reading=args.reading,
                                      report=not args.no_report, position=args.position or DEFAULT_POSITION,
                                      max_steps=args.max_steps)
        default_out = "results/pretrained"
    else:
        status = reproduce(args.protocol, out=args.out, runs=args.runs, only=args.only, seeds=args.seeds,
                           progress=not args.quiet, device=args.device, budget_s=budget_s,
                           report=not args.no_report, gpus=args.gpus, steps=args.steps,
                           jobs_per_gpu=args.jobs_per_gpu)
        default_out = "results/" + args.protocol
    for name, state in status.items():
        print(f"{name:40s} {state}")
    if not args.no_report and not args.slurm_no_wait:
        print(f"report: {args.out or default_out}/REPORT.md")
    if any(state.startswith(("FAILED", "not started (a unit")) for state in status.values()):
        raise GatelabError("some units failed; their logs are named above")


def cmd_report(args) -> None:
    from gatelab.reproduce.report.compact import write_report
    from gatelab.reproduce.suite import PROTOCOLS, Suite
    if args.suite == "pretrained":
        from gatelab.reproduce.pretrained import PROTOCOLS as PRETRAINED
        from gatelab.reproduce.report.pretrained import write_pretrained_report
        print(f"wrote {write_pretrained_report(args.out or 'results/pretrained', PRETRAINED[args.protocol])}")
        return
    out = args.out or f"results/{args.protocol}"
    protocol = PROTOCOLS[args.protocol]
    units = list(Suite(protocol, "-", "-", progress=False).units)
    print(f"wrote {write_report(out, protocol, units)}")


def cmd_demo(args) -> None:
    from gatelab.reproduce.demo import run_demo
    table = run_demo(args.out, steps=args.steps, progress=not args.quiet)
    print(table)


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or key.strip().startswith("-"):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (an sbatch option without its --), got {text!r}")
    return key.strip(), value


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
    g.add_argument("--slurm-param", metavar="KEY=VALUE", type=_key_value, action="append",
                   help="a further sbatch option, repeatable: --slurm-param account=lab --slurm-param mem=32G")
    g.add_argument("--slurm-config", metavar="FILE",
                   help="a JSON or TOML file of these options (partition, gpus_per_job, tasks_per_job, time, "
                        "array_parallelism, params, setup: shell lines run before each job, poll_seconds); flags "
                        "override it")
    g.add_argument("--slurm-no-wait", action="store_true",
                   help="submit and return; the same command later waits and writes the report (or `gatelab report`)")


# ----------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="gatelab", description="Learned sparse-attention routing, and whether it "
                                 "beats a random one (reproduces arXiv 2603.02227).")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the main job on the bundled corpus: train a small dense and a soft-gated "
                       "model, evaluate both under several routings, print a table (minutes on CPU)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=POS_INT, default=100, help="training steps per model (default 100)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("info", help="parameter counts of a model config")
    p.add_argument("--config", help="JSON or TOML train config")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.n_layer=4")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("prepare", help="tokenise a corpus into uint16 token files")
    p.add_argument("--corpus", default="bundled", choices=("bundled", "wikitext-103", "wikitext-2", "text"))
    p.add_argument("--source", help="wikitext: folder with wiki.{train,valid,test}.raw; text: a file or folder")
    p.add_argument("--out", help="output folder (default data/prepared/bundled for the bundled corpus, else "
                   "data/prepared/CORPUS-HASH, HASH a short hash of --source's path, or data/prepared/NAME)")
    p.add_argument("--name", help="prepare into data/prepared/NAME")
    p.add_argument("--context", type=POS_INT, default=512,
                   help="the model context you will train with (default 512, the model's default): the train split "
                        "must hold one window of context+1 tokens and validation and test 2 tokens each; a text "
                        "corpus whose documents are too few or too long to split 98/1/1 with a full window in every "
                        "split is cut by tokens instead")
    p.add_argument("--force", action="store_true", help="tokenise again even if the output is current, and replace "
                   "an output folder that holds other data (runs trained on that data will then refuse it)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a model (resumes automatically from a checkpoint in --out)")
    p.add_argument("--config", help="JSON or TOML train config (see experiments/)")
    p.add_argument("--out", required=True, help="run directory")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="require a checkpoint in --out and continue it")
    g.add_argument("--fresh", action="store_true", help="ignore any checkpoint in --out and start over")
    p.add_argument("--quiet", action="store_true")
    add_reference_arg(p)
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=500 routing.mode=soft-gate")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="perplexity of a checkpoint under one or more routings")
    p.add_argument("checkpoint", help="a checkpoint directory (RUN/checkpoint)")
    add_routing_args(p)
    p.add_argument("--gate", help="a distilled gate (from `gatelab distill`) to use for gate routings")
    p.add_argument("--allow-other-base", action="store_true",
                   help="allow a gate distilled on another checkpoint (the paper's Experiment 3)")
    p.add_argument("--split", default="validation", choices=("train", "validation", "test"))
    p.add_argument("--data", help="prepared corpus folder (default: the one the checkpoint was trained on)")
    add_other_data_arg(p)
    p.add_argument("--batch-size", type=POS_INT, default=16)
    p.add_argument("--max-tokens", type=NONNEG_INT, default=0, help="evaluate only about this many tokens (0 = all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=NONNEG_INT, default=0, help="torch seed (stochastic routing)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("audit", help="does a learned gate beat a frozen random gate of the same form? "
                       "(learned, random, oracle and dense in one table)")
    p.add_argument("checkpoint", nargs="?", help="a gatelab checkpoint (RUN/checkpoint); or use --model")
    p.add_argument("--model", help="a local Hugging Face model folder (with --gate GATES from hf-distill)")
    p.add_argument("--gguf", help="with --model: a GGUF file inside it")
    p.add_argument("--gate", help="audit a distilled gate instead of the checkpoint's own")
    p.add_argument("--control", help="a checkpoint trained the same way with a frozen random gate (e.g. "
                   "runs/compact/exp1-sigmoid-random-s0/checkpoint): also compare against it, the paper's Experiment 1")
    p.add_argument("--allow-other-base", action="store_true",
                   help="accept a gate saved for another base model (its fingerprint differs)")
    p.add_argument("--position", choices=POSITIONS, help="with --model: the gate variant --gate must be (default: "
                   "the one its gate.json records; the random control is always of that variant)")
    p.add_argument("--k", type=POS_INT, default=64, help="keys kept per query under hard top-k (default 64)")
    p.add_argument("--split", default="validation", choices=("train", "validation", "test"))
    p.add_argument("--data", help="prepared corpus folder (default: the checkpoint's)")
    add_other_data_arg(p)
    p.add_argument("--max-tokens", type=NONNEG_INT, default=0, help="evaluate only about this many tokens (0 = all)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when there is one)")
    p.add_argument("--json", help="also write the table and the summary to this JSON file")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("hf-eval", help="perplexity of a local Hugging Face causal LM under gatelab routings")
    p.add_argument("--model", required=True, help="a local model folder (or the folder holding --gguf)")
    p.add_argument("--gguf", help="a GGUF file inside --model (dequantised on load; needs `pip install gguf`)")
    add_routing_args(p)
    p.add_argument("--corpus", default="bundled", choices=("bundled", "wikitext-103", "wikitext-2", "text"))
    p.add_argument("--source")
    p.add_argument("--split", default="validation", choices=("train", "validation", "test"))
    p.add_argument("--context", type=POS_INT, default=512)
    p.add_argument("--batch-size", type=POS_INT, default=4)
    p.add_argument("--max-tokens", type=NONNEG_INT, default=0, help="evaluate only about this many tokens (0 = all)")
    p.add_argument("--gate", help="gates saved by `gatelab hf-distill` (token gates for gate-topk / soft-gate, "
                   "block gates for block-gate / block-soft)")
    p.add_argument("--position", choices=POSITIONS, help="the variant --gate must be (default: the one its "
                   "gate.json records); a gate of another variant is refused")
    p.add_argument("--long-docs", action="store_true", help="evaluate only documents longer than --context, each "
                   "in whole --context windows (none crosses a document boundary)")
    p.add_argument("--allow-other-base", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--json")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_hf_eval)

    p = sub.add_parser("hf-distill", help="train gates on a frozen (or partly unfrozen) Hugging Face causal LM",
                       description="Train gates on a frozen (or partly unfrozen) Hugging Face causal LM; writes "
                       "OUT/gate.{safetensors,json} (the variant recorded), OUT/metrics.jsonl, OUT/done.json; resumes "
                       "from OUT/checkpoint.pt. Gate variants (--position): " + POSITION_HELP + ". Until convergence: "
                       "--eval-every N --patience P evaluates the objective on held-out training windows every N "
                       "steps and stops after P evaluations without improvement (--steps is then the cap).")
    p.add_argument("--model", required=True)
    p.add_argument("--gguf")
    p.add_argument("--loss", choices=("kl", "bce", "task"), default="kl",
                   help="kl: KL(dense attention || softmax(G)); bce: G vs the oracle top-k mask; "
                        "task: LM loss through the soft gate (default kl)")
    p.add_argument("--reading", default=DEFAULT_READING,
                   choices=tuple(READINGS),
                   help=f"--loss task: the soft-gate reading trained through (default {DEFAULT_READING})")
    p.add_argument("--position", choices=POSITIONS,
                   help=f"gate variant (default {DEFAULT_POSITION}): {POSITION_HELP}. Block gates (--block-size) "
                        f"read none (the default: X pooled per block) or qk (the model's own post-RoPE queries and "
                        f"keys pooled per block and head, as SeerAttention)")
    p.add_argument("--k", type=POS_INT, default=64)
    p.add_argument("--d-gate", type=POS_INT, default=32)
    p.add_argument("--steps", type=POS_INT, default=1000, help="training steps (with --patience: the most)")
    p.add_argument("--eval-every", type=NONNEG_INT, default=0, help="every N steps, the objective (and F1) on held-out "
                   "windows (the last --eval-batches x --batch-size windows of the training split, never trained "
                   "on) goes to metrics.jsonl as val_loss; the best evaluation's gates are kept (default 0: off)")
    p.add_argument("--patience", type=NONNEG_INT, default=0, help="stop after this many evaluations in a row without "
                   "improvement (needs --eval-every; default 0: train all --steps)")
    p.add_argument("--min-delta", type=NONNEG_FLOAT, default=0.002, help="an improvement lowers the best held-out value "
                   "by more than this fraction (default 0.002)")
    p.add_argument("--eval-batches", type=POS_INT, default=2, help="held-out batches (default 2)")
    p.add_argument("--no-step-f1", action="store_true", help="leave the per-step training F1 out of the log (it "
                   "costs a top-k per layer and step; the held-out evaluations still report F1)")
    p.add_argument("--batch-size", type=POS_INT, default=8)
    p.add_argument("--context", type=POS_INT, default=512)
    p.add_argument("--lr", type=POS_FLOAT, default=1e-3)
    p.add_argument("--seed", type=NONNEG_INT, default=0)
    p.add_argument("--unfreeze-layers", type=_csv(NONNEG_INT), help="layers whose q/k/v/o projections also train "
                   "(the paper's Tables 7-8)")
    add_block_gate_args(p)
    p.add_argument("--long-docs", action="store_true", help="train on the documents longer than --context only")
    p.add_argument("--corpus", default="bundled", choices=("bundled", "wikitext-103", "wikitext-2", "text"))
    p.add_argument("--source")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_hf_distill)

    p = sub.add_parser("reproduce", help="every 31M-model experiment of the paper as resumable units, and a report")
    p.add_argument("--protocol", choices=("paper", "compact", "smoke"), default="compact",
                   help="paper: the paper's settings on WikiText-103 (docs/method.md); compact: the bundled corpus (default); "
                        "smoke: a tiny model in minutes on CPU")
    p.add_argument("--only", type=_csv(str), help="comma-separated units or experiments (exp1, exp2, exp3, exp4, "
                   "table4, table5, figure1, baseline, readings, block, regime, or unit-name prefixes)")
    p.add_argument("--suite", choices=("31m", "pretrained"), default="31m",
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
    p.add_argument("--gpus", type=_gpus, default=None, help="run independent units concurrently, one process per "
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
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("report", help="rebuild REPORT.md and plots from a reproduction's per-unit results")
    p.add_argument("--protocol", choices=("paper", "compact", "smoke"), default="compact")
    p.add_argument("--suite", choices=("31m", "pretrained"), default="31m")
    p.add_argument("--out", help="results folder (default results/PROTOCOL)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("distill", help="train fresh gate projections on a frozen checkpoint (post-hoc gates)")
    p.add_argument("checkpoint", help="the frozen base checkpoint (RUN/checkpoint)")
    p.add_argument("--loss", choices=("kl", "bce", "task"), default="kl",
                   help="kl: KL(dense attention || softmax(G)); bce: G vs the oracle top-k mask; "
                        "task: LM loss through the soft gate (default kl)")
    p.add_argument("--k", type=POS_INT, default=64)
    p.add_argument("--d-gate", type=POS_INT, default=32)
    p.add_argument("--steps", type=POS_INT, default=1000)
    p.add_argument("--batch-size", type=POS_INT, default=16)
    p.add_argument("--lr", type=POS_FLOAT, default=1e-3)
    p.add_argument("--seed", type=NONNEG_INT, default=0, help="gate initialisation and batch order")
    p.add_argument("--random-control", action="store_true",
                   help="task loss control: write the frozen random gate of the same initialisation, train nothing")
    p.add_argument("--reading", choices=tuple(READINGS), default=None,
                   help=f"--loss task: the soft-gate reading trained through (default {DEFAULT_READING}, the "
                        f"reading study's choice; README)")
    p.add_argument("--data", help="prepared corpus folder (default: the base checkpoint's)")
    add_other_data_arg(p)
    add_block_gate_args(p)
    p.add_argument("--out", required=True, help="run directory; the gate is written to OUT/gate.{json,safetensors}")
    p.add_argument("--fresh", action="store_true", help="ignore a checkpoint in --out and start over")
    p.add_argument("--quiet", action="store_true")
    add_reference_arg(p)
    p.add_argument("overrides", nargs="*", help="train-config overrides, e.g. eval_every=250 device=cpu")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("analyze", help="attention concentration, gate F1 and gate gradients of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--gate", help="a distilled gate to measure instead of the checkpoint's own")
    p.add_argument("--allow-other-base", action="store_true")
    p.add_argument("--k", type=_csv(int), default=[64], help="comma-separated k values (default 64)")
    p.add_argument("--batches", type=POS_INT, default=4)
    p.add_argument("--batch-size", type=POS_INT, default=8)
    p.add_argument("--split", default="validation", choices=("train", "validation", "test"))
    p.add_argument("--data", help="prepared corpus folder (default: the checkpoint's)")
    add_other_data_arg(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=NONNEG_INT, default=0)
    p.add_argument("--out", help="output folder (default: next to the checkpoint, analysis/)")
    p.set_defaults(func=cmd_analyze)
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as e:  # argparse: --help exits 0 (let it), a usage error printed its line (Parser.error)
        if e.code == 2:
            return 2
        raise
    # argparse cannot take `key=value` overrides after options that follow another positional; accept them
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        try:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        except SystemExit as e:
            return e.code
    keep_freed_memory()
    try:
        if getattr(args, "json", None):  # refuse before the work, not after it
            check_writable(args.json, "--json")
        args.func(args)
    except GatelabError as e:
        print(f"gatelab: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the user gave that cannot be read or written (permissions, a folder, disk full)
        where = f": {e.filename}" if e.filename else ""
        print(f"gatelab: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gatelab: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
