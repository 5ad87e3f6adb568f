"""Gate files of gatelab's GPT (gate.safetensors + gate.json naming the base checkpoint and its sha256): export and
attach token and block gates, and the frozen random control of the same form."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from gatelab.attention.gates import BilinearGate, BlockGate
from gatelab.config import GatelabError, TrainConfig, follow_umask, to_dict, write_json
from gatelab.data import TokenData, sha256_file
from gatelab.training.checkpoint import MODEL_FILE, build_model, check_finite, find_checkpoint

BLOCK_GATE_FORMAT = "gatelab-block-gate-v1"


# what a block gate's scores mean, recorded in saved gates: each query block ranked by the previous block's row
# (previous_block_rows). Gates saved before it (own-row, not causal) have no such field and are refused.
BLOCK_ROWS = "previous-block"


def check_block_rows(meta: dict, path) -> None:
    if meta.get("block_rows") != BLOCK_ROWS:
        raise GatelabError(f"block gate {path} was distilled before block selection became causal (its gate.json has "
                           f"no block_rows: {BLOCK_ROWS!r}); distil it again")


def export_block_gate(model, cfg, out_dir):
    """Write the GPT's block gates alone: OUT/gate.safetensors + OUT/gate.json (format gatelab-block-gate-v1:
    base checkpoint and its sha256, shape, d_gate, pooling, the block size and k it was distilled at)."""


    out = Path(out_dir)
    state = {f"blocks.{i}.{name}": p.detach().cpu().contiguous()
             for i, b in enumerate(model.blocks) for name, p in (("wq", b.attn.block_gate.wq),
                                                                  ("wk", b.attn.block_gate.wk))}
    base = find_checkpoint(cfg.init_from) if cfg.init_from else None
    meta = dict(format=BLOCK_GATE_FORMAT, base_checkpoint=str(cfg.init_from) if cfg.init_from else None,
                base_sha256=sha256_file(base / MODEL_FILE) if base else None, n_layer=model.cfg.n_layer,
                n_head=model.cfg.n_head, d_model=model.cfg.d_model, d_gate=model.cfg.d_gate,
                block_pool=model.cfg.block_pool, block_size=cfg.routing.block_size, block_k=cfg.routing.block_k,
                loss=cfg.objective, steps=cfg.steps, seed=cfg.seed, routing=to_dict(cfg.routing),
                block_rows=BLOCK_ROWS, data_fingerprint=trained_on(cfg))
    tmp = out / (GATE_WEIGHTS + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(out / GATE_WEIGHTS)
    write_json(out / GATE_META, meta)
    return out / GATE_META


def attach_block_gate(model, meta: dict, state: dict) -> dict:
    """Give every layer of the GPT the saved block gate (frozen); the checks of distill.attach_gate ran already."""
    check_block_rows(meta, "(GPT block gate)")
    cfg = model.cfg
    device = next(model.parameters()).device
    for i, block in enumerate(model.blocks):
        gate = BlockGate(cfg.d_model, cfg.n_head, int(meta["d_gate"]), meta.get("block_pool", "mean"),
                         trainable=False)
        gate.wq.data.copy_(state[f"blocks.{i}.wq"])
        gate.wk.data.copy_(state[f"blocks.{i}.wk"])
        block.attn.block_gate = gate.to(device)
    cfg.block_gate, cfg.block_pool = "random", meta.get("block_pool", "mean")
    return meta


GATE_WEIGHTS, GATE_META = "gate.safetensors", "gate.json"


def export_gate(model, cfg: TrainConfig, out_dir: str | Path, extra: dict | None = None) -> Path:
    out = Path(out_dir)
    state = {f"blocks.{i}.{name}": p.detach().cpu().contiguous()
             for i, b in enumerate(model.blocks) if b.attn.gate is not None
             for name, p in (("wq", b.attn.gate.wq), ("wk", b.attn.gate.wk))}
    base = find_checkpoint(cfg.init_from) if cfg.init_from else None
    meta = dict(format="gatelab-gate-v1", base_checkpoint=str(cfg.init_from) if cfg.init_from else None,
                base_sha256=sha256_file(base / MODEL_FILE) if base else None,
                n_layer=model.cfg.n_layer, n_head=model.cfg.n_head, d_model=model.cfg.d_model,
                d_gate=model.cfg.d_gate, k=cfg.routing.k, loss={"lm": "task"}.get(cfg.objective, cfg.objective),
                frozen_random=model.cfg.gate == "random", steps=cfg.steps, seed=cfg.seed,
                routing=to_dict(cfg.routing), data_fingerprint=trained_on(cfg), **(extra or {}))
    tmp = out / (GATE_WEIGHTS + ".tmp")
    save_file(state, str(tmp))
    follow_umask(tmp)  # safetensors creates its files 0600
    tmp.replace(out / GATE_WEIGHTS)
    write_json(out / GATE_META, meta)
    return out / GATE_META


def trained_on(cfg: TrainConfig) -> dict | None:
    """The fingerprint of the data a gate was trained on (None when that data cannot be read)."""
    try:
        return TokenData(cfg.data, "train").fingerprint
    except (GatelabError, OSError, ValueError):
        return None


def export_random_control(cfg: TrainConfig, out_dir: str | Path, device) -> Path:
    """The task loss's control: nothing trains; write the frozen random gate of the same initialisation."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return export_gate(build_model(cfg, device), cfg, out_dir)


def read_gate(path: str | Path) -> tuple[dict, dict]:
    path = Path(path)
    folder = path.parent if path.name in (GATE_META, GATE_WEIGHTS) else path
    meta_f, weights_f = folder / GATE_META, folder / GATE_WEIGHTS
    if not meta_f.is_file() or not weights_f.is_file():
        raise GatelabError(f"{path} is not a gate (needs {GATE_META} and {GATE_WEIGHTS}; `gatelab distill` "
                           f"writes them into its run directory)")
    try:
        meta, state = json.loads(meta_f.read_text()), load_file(str(weights_f))
    except Exception as e:  # noqa: BLE001
        raise GatelabError(f"gate {folder} is corrupt ({type(e).__name__}: {e})") from None
    return meta, check_finite(state, f"gate file {weights_f}")


def attach_gate(model, gate_path: str | Path, checkpoint: str | Path | None = None,
                allow_other_base: bool = False) -> dict:
    """Replace the model's gates by a saved gate (frozen). Refuses a gate made for another shape; a gate
    distilled on another checkpoint needs allow_other_base (the paper's Experiment 3 does it on purpose)."""
    meta, state = read_gate(gate_path)
    cfg = model.cfg
    is_block_gate = meta.get("format") == "gatelab-block-gate-v1"
    shape = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=cfg.d_model)
    wrong = {k: (meta.get(k), v) for k, v in shape.items() if meta.get(k) != v}
    if wrong:
        diffs = ", ".join(f"{k} {a} vs {b}" for k, (a, b) in wrong.items())
        raise GatelabError(f"gate {gate_path} was made for a model of another shape ({diffs} in this model)")
    if checkpoint is not None and meta.get("base_sha256"):
        found = find_checkpoint(checkpoint)
        digest = sha256_file(found / MODEL_FILE) if found else None
        if digest != meta["base_sha256"]:
            msg = (f"gate {gate_path} was distilled on another checkpoint ({meta.get('base_checkpoint')}), "
                   f"not on {checkpoint}")
            if not allow_other_base:
                raise GatelabError(msg + "; pass --allow-other-base to deploy it anyway (the paper's Experiment 3)")
            print(f"gatelab: WARNING: {msg}; deploying it anyway because --allow-other-base was given",
                  file=sys.stderr)
    if is_block_gate:  # a block gate (blocks.export_block_gate)
        return attach_block_gate(model, meta, state)
    device = next(model.parameters()).device
    for i, block in enumerate(model.blocks):
        gate = BilinearGate(cfg.d_model, cfg.n_head, int(meta["d_gate"]), trainable=False)
        gate.wq.data.copy_(state[f"blocks.{i}.wq"])
        gate.wk.data.copy_(state[f"blocks.{i}.wk"])
        block.attn.gate = gate.to(device)
    model.cfg.d_gate = int(meta["d_gate"])
    return meta
