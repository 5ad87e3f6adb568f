"""The commands that measure a checkpoint: eval (perplexity under routings), analyze (attention concentration,
gate F1 and gradients) and audit (a learned gate against a frozen random gate of the same form)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from gatelab.cli.commands.common import (
    finite_result, gate_block_size, load_checked_data, load_for_evaluation, routings_from_args
)
from gatelab.config import GatelabError, Routing, write_json
from gatelab.data import check_same_data
from gatelab.devices import resolve_device
from gatelab.diagnostics import evaluate as evaluation
from gatelab.diagnostics.analyze import MIN_ORACLE_GAIN, analyze, audit, ensure_gate
from gatelab.hf import corpus as hf_corpus, gate_files as hf_gate_files
from gatelab.hf.audit import hf_audit
from gatelab.tables import format_table
from gatelab.training.checkpoint import load_model

# perplexity, load_pretrained and encode_corpus are called through their modules, so that a replacement put
# there (monkeypatch) reaches these commands


def run_eval(args) -> None:
    model, trainer, device = load_for_evaluation(args)
    data = load_checked_data(args, trainer)
    data_dir = data.folder
    rows = []
    torch.manual_seed(args.seed)
    for routing in routings_from_args(args, model.cfg.context, gate_block_size(args.gate)):
        if routing.needs_gate and not model.gates():
            raise GatelabError(f"--routing {routing.mode} needs a gate: this checkpoint has none; pass --gate GATE")
        if routing.needs_block_gate and not model.block_gates():
            raise GatelabError(f"--routing {routing.mode} needs a block gate: this checkpoint has none; pass --gate "
                               f"GATE (from `gatelab distill --block-size ...`)")
        res = finite_result(evaluation.perplexity(model, data, routing, args.batch_size, args.max_tokens,
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


def run_analyze(args) -> None:
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


def run_audit(args) -> None:
    if args.model:  # a Hugging Face model with gates saved by hf-distill
        _audit_hf(args)
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
        control, control_trainer = load_model(args.control, device=next(model.parameters()).device)
        check_same_data(control_trainer.get("data_fingerprint"), data, f"control {args.control}",
                        args.allow_other_data)
    res = audit(model, trainer, data, args.k, gate_meta=meta, max_tokens=args.max_tokens, control=control)
    _print_audit(res, args)


def _audit_hf(args) -> None:
    """audit --model: the gates hf-distill saved for a Hugging Face model, on the bundled corpus."""
    if args.control:
        raise GatelabError("--control compares gatelab checkpoints; it does not apply to --model")
    if not args.gate or args.checkpoint:
        raise GatelabError("audit --model DIR needs --gate GATES (saved by gatelab hf-distill) and no checkpoint")
    model, tok = hf_gate_files.load_pretrained(args.model, args.gguf, device=resolve_device(args.device))
    ids = hf_corpus.encode_corpus(tok, "bundled", args.split, progress=True)
    res = hf_audit(model, args.gate, ids, args.k, max_tokens=args.max_tokens,
                   allow_other_base=args.allow_other_base, progress=True, position=args.position)
    print(f"gate variant: {res['position']}", file=sys.stderr)
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
