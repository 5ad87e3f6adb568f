"""The training commands: info (parameter counts), prepare (tokenise a corpus), train, and distill (gates on a
frozen checkpoint)."""
from __future__ import annotations

import json

from gatelab.cli.commands.common import print_summary, train_under_torchrun
from gatelab.config import (
    GatelabError, Routing, apply_overrides, load_train_config, to_dict, train_config_from_dict
)
from gatelab.data import prepare, prepared_folder
from gatelab.devices import resolve_device
from gatelab.model import GPT
from gatelab.tables import format_table
from gatelab.training.distill import distill_config
from gatelab.training.gate_files import export_random_control

REFERENCE_OVERRIDES = ["compile=false", "fused_loss=false"]  # --reference: the plain eager path


def run_info(args) -> None:
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


def run_prepare(args) -> None:
    if args.out and args.name:
        raise GatelabError("give --out DIR or --name NAME, not both")
    out = args.out or str(prepared_folder(args.corpus, args.source, args.name))
    meta = prepare(args.corpus, out, source=args.source, context=args.context, force=args.force,
                   progress=not args.quiet)
    cut = " (cut by tokens: too few or too long documents to split by document)" if meta.get("split_by") == \
        "tokens" else ""
    print(f"prepared {args.corpus} in {out}: " + ", ".join(f"{k} {v:,} tokens" for k, v in meta["tokens"].items())
          + cut + f"; fingerprint {meta['fingerprint']['id']} (train on it with data={out})")


def run_train(args) -> None:
    cfg = load_train_config(args.config, list(args.overrides) + (REFERENCE_OVERRIDES if args.reference else []))
    resume = "require" if args.resume else "never" if args.fresh else "auto"
    print_summary(train_under_torchrun(cfg, args.out, resume=resume, progress=not args.quiet), args.out)


def run_distill(args) -> None:
    block = (Routing(mode="block-gate", block_size=args.block_size, block_k=args.block_k)
             if args.block_size else None)
    cfg = distill_config(args.checkpoint, args.loss, k=args.k, d_gate=args.d_gate, steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, seed=args.seed, random_control=args.random_control,
                         data=args.data, reading=args.reading, block=block, block_pool=args.block_pool,
                         allow_other_data=args.allow_other_data)
    cfg = train_config_from_dict(apply_overrides(to_dict(cfg), list(args.overrides) +
                                                 (REFERENCE_OVERRIDES if args.reference else []))).validate()
    if args.random_control:  # nothing trains: export the frozen random gate of the same initialisation
        print(f"frozen random gate written to {export_random_control(cfg, args.out, resolve_device(cfg.device))}")
        return
    print_summary(train_under_torchrun(cfg, args.out, resume="never" if args.fresh else "auto",
                                       progress=not args.quiet), args.out)
