"""What several commands share when they run: the routings of --routing and --k, a checkpoint loaded with its
gate and checked data, the check of an evaluation result, and training under torchrun with its summary."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from gatelab.config import BLOCK_MODES, READINGS, GatelabError, Routing
from gatelab.data import TokenData, check_same_data
from gatelab.devices import resolve_device
from gatelab.training import distributed
from gatelab.training.checkpoint import load_model
from gatelab.training.gate_files import attach_gate
from gatelab.training.train import train


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


def gate_block_size(path) -> int | None:
    """The block size a saved block gate was distilled at (None for token gates)."""
    if not path:
        return None
    folder = Path(path).parent if Path(path).is_file() else Path(path)
    meta = folder / "gate.json"
    if not meta.is_file():
        return None
    data = json.loads(meta.read_text())
    return data.get("block_size") if data.get("gate_type") == "block" or "block" in data.get("format", "") else None


def load_for_evaluation(args):
    """The checkpoint's model on the chosen device, with --gate attached when given (its gate.json in
    args.gate_meta, else None)."""
    device = resolve_device(args.device)
    model, trainer = load_model(args.checkpoint, device=device)
    args.gate_meta = None
    if args.gate:
        args.gate_meta = attach_gate(model, args.gate, args.checkpoint, allow_other_base=args.allow_other_base)
    return model, trainer, device


def load_checked_data(args, trainer: dict):
    """--data (default: the checkpoint's training data) at --split, refused unless it is the data the checkpoint
    and --gate were trained on (their recorded fingerprints; --allow-other-data: a warning instead)."""
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


def train_under_torchrun(cfg, out, **kw) -> dict:
    """train(), leaving torchrun's process group (if any) cleanly; only rank 0 prints the summary."""
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
