"""`gatelab reproduce --suite pretrained`: the paper's scale experiments (section 5, Tables 6-9, Figure 3) on a
pretrained Hugging Face causal LM (SmolLM2-135M here, in place of the paper's Qwen3-1.7B).

Units, each with its own directory and result.json (finished units are skipped; a killed training resumes from its
checkpoint.pt, see hf.distill.train_gates):
  table9                      dense, oracle top-k and random top-k perplexity at k = 64, 128, 256
  table6-kl-d{32,64,128}      post-hoc KL gates, deployed as hard top-k at each k (KL does not depend on k)
  table6-bce-d32-k{64,128,256}, table6-bce-d{64,128}-k64   post-hoc BCE gates (the target depends on k)
  table7-{none,learned,random}  one middle layer's Q/K/V/O unfrozen, a soft gate on that layer only, LM loss
  table8-n{0,2,4,8}-{learned,random}  n middle layers' Q/K/V/O unfrozen, soft gates on all layers, LM loss
  pos-{none,rope,qk}-kl-d{32,64}  the gate-variant study (hf_gates.py): KL gates of each variant, trained until the
                              held-out KL stops improving (capped), deployed as hard top-k at each k
  table6-{P}-bce-d32-k{64,128,256}  Table 6's BCE gates again, of variant P (--position; default
                              hf_gates.DEFAULT_POSITION), trained like the study's gates; its KL row is pos-P-kl-d32
The model is loaded once; every unit starts from its pristine weights.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gatelab.attention.position_gates import DEFAULT_POSITION, check_position
from gatelab.config import DEFAULT_READING, GatelabError, Routing, soft_gate_routing, write_text
from gatelab.devices import autocast_for, resolve_device
from gatelab.hf.adapter import attach_gates, set_trainable
from gatelab.hf.corpus import encode_corpus
from gatelab.hf.distill import captured_gate_f1, train_gates
from gatelab.hf.evaluate import hf_perplexity
from gatelab.hf.gate_files import load_pretrained
from gatelab.reproduce.pretrained_protocols import PROTOCOLS, PretrainedProtocol, _reading_tag
from gatelab.reproduce.report.pretrained import write_pretrained_report
from gatelab.reproduce.suite import UnitSuite, output_folders


def middle_layers(n_layers: int, n: int) -> list[int]:
    """n consecutive layers centred in the stack (the paper does not say which layers it unfroze)."""
    start = max(0, (n_layers - n) // 2)
    return list(range(start, start + n))


@dataclass
class Unit:
    name: str
    table: str
    params: dict


class PretrainedSuite(UnitSuite):
    label, groups = "reproduce pretrained", "tables"

    def __init__(self, protocol: PretrainedProtocol, load: Callable[[], object], train_ids, val_ids,
                 out: str | Path, runs: str | Path, model_name: str, progress: bool = True,
                 reading: str = DEFAULT_READING, position: str = DEFAULT_POSITION):
        self.p, self.load, self.out, self.runs = protocol, load, Path(out), Path(runs)
        self.train_ids, self.val_ids, self.model_name, self.progress = train_ids, val_ids, model_name, progress
        soft_gate_routing(reading, protocol.k)  # an unknown reading fails here, before any unit runs
        check_position(position)
        self.model, self.reading, self.position = None, reading, position
        self.units: dict[str, Unit] = {}
        p = protocol
        tag = _reading_tag(reading)
        self.add("table9", "table9")
        for d in p.d_gates:
            self.add(f"table6-kl-d{d}", "table6", loss="kl", d_gate=d, k=p.k, deploy=list(p.ks))
        for k in p.ks:
            self.add(f"table6-bce-d{p.d_gates[0]}-k{k}", "table6", loss="bce", d_gate=p.d_gates[0], k=k, deploy=[k])
        for d in p.d_gates[1:]:
            self.add(f"table6-bce-d{d}-k{p.k}", "table6", loss="bce", d_gate=d, k=p.k, deploy=[p.k])
        for gate in ("none", "learned", "random"):
            self.add(f"table7-{gate}{tag}", "table7", gate=gate, unfreeze=1, gated_layers="unfrozen", reading=reading)
        for n in p.unfreeze:
            for gate in ("learned", "random"):
                self.add(f"table8-n{n}-{gate}{tag}", "table8", gate=gate, unfreeze=n, gated_layers="all",
                         reading=reading)
        for pos in p.positions:  # the gate-variant study; KL does not depend on k, so one gate serves every k
            for d in p.position_d_gates:
                self.add(f"pos-{pos}-kl-d{d}", "positions", loss="kl", d_gate=d, k=p.k, deploy=list(p.ks),
                         position=pos, converge=True)
        for k in p.ks:  # Table 6's BCE gates of the chosen variant (its KL row: pos-{position}-kl-d{d_gates[0]})
            self.add(f"table6-{position}-bce-d{p.d_gates[0]}-k{k}", "table6-position", loss="bce",
                     d_gate=p.d_gates[0], k=k, deploy=[k], position=position, converge=True)

    def add(self, name: str, table: str, **params) -> None:
        self.units[name] = Unit(name, table, params)

    def group(self, unit: Unit) -> str:
        return unit.table

    # -------------------------------------------------------------------------------------------------------
    def fresh_model(self):
        """The pretrained model with its original weights, no gates, nothing trainable."""
        if self.model is None:
            self.model = self.load()
            self.pristine = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        m = self.model
        if hasattr(m, "gatelab_gates"):
            del m.gatelab_gates
        m.load_state_dict(self.pristine, strict=True)
        for q in m.parameters():
            q.requires_grad_(False)
        return m

    def ppl(self, model, routing: Routing) -> float:
        return hf_perplexity(model, self.val_ids, routing, context=self.p.context, batch_size=self.p.batch_size,
                             max_tokens=self.p.eval_tokens)["ppl"]

    def run_unit(self, unit: Unit) -> dict:
        run = {"table9": self.run_table9, "table6": self.run_posthoc, "positions": self.run_posthoc,
               "table6-position": self.run_posthoc}.get(unit.table, self.run_task)
        return dict(run(unit), table=unit.table, model=self.model_name,
                    device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    protocol=asdict(self.p))

    def run_table9(self, unit: Unit) -> dict:
        model = self.fresh_model()
        attach_gates(model, gate="none")
        evals = {"dense": self.ppl(model, Routing())}
        for mode in ("oracle-topk", "random-topk"):
            for k in self.p.ks:
                evals[f"{mode}@k={k}"] = self.ppl(model, Routing(mode=mode, k=k))
        return dict(evals=evals)

    def _train(self, unit: Unit, model, loss: str, k: int, steps: int, soft: Routing | None = None,
               converge: bool = False) -> dict:
        run_dir = self.runs / unit.name
        p = self.p
        until = dict(steps=p.converge_max_steps, eval_every=p.eval_every, patience=p.patience, min_delta=p.min_delta,
                     eval_batches=p.eval_batches, step_f1=False) if converge else dict(steps=steps)
        summary = train_gates(model, self.train_ids, run_dir, loss=loss, k=k, batch_size=p.batch_size,
                              context=p.context, lr=p.gate_lr, model_lr=p.model_lr, progress=self.progress,
                              soft_routing=soft, **until)
        metrics = run_dir / "metrics.jsonl"
        text = metrics.read_text() if metrics.is_file() else ""
        self.unit_dir(unit.name).mkdir(parents=True, exist_ok=True)
        if text:
            write_text(self.unit_dir(unit.name) / "metrics.jsonl", text)
        rows = [json.loads(x) for x in text.splitlines() if x.strip()]
        out = dict(summary=summary, curve=[(r["step"], r["loss"]) for r in rows if "loss" in r])
        if converge:
            out["val_curve"] = [(r["step"], r["val_loss"], r.get("val_f1")) for r in rows if "val_loss" in r]
        return out

    def run_posthoc(self, unit: Unit) -> dict:

        prm = unit.params
        position = prm.get("position", "none")
        model = self.fresh_model()
        attach_gates(model, d_gate=prm["d_gate"], gate="learned", position=position)
        set_trainable(model, layers=[])
        trained = self._train(unit, model, prm["loss"], prm["k"], self.p.posthoc_steps,
                              converge=prm.get("converge", False))
        t0 = time.time()
        evals = {f"gate-topk@k={k}": self.ppl(model, Routing(mode="gate-topk", k=k)) for k in prm["deploy"]}
        eval_s = time.time() - t0
        layers = hf_gate_f1_layers(model, self.val_ids, list(prm["deploy"]), self.p)
        return dict(loss=prm["loss"], d_gate=prm["d_gate"], k=prm["k"], position=position, evals=evals,
                    val_f1={k: float(np.mean(v)) for k, v in layers.items()}, val_f1_layers=layers,
                    deploy_eval_s=eval_s, **trained)

    def run_task(self, unit: Unit) -> dict:
        prm = unit.params
        model = self.fresh_model()
        n_layers = model.config.num_hidden_layers
        layers = middle_layers(n_layers, prm["unfreeze"])
        # the paper's gate form (pre-RoPE), whatever DEFAULT_POSITION says: the committed Tables 7-8 used it
        ctl = attach_gates(model, d_gate=self.p.d_gates[0], gate=prm["gate"], position="none")
        ctl.layers = set(layers) if prm["gated_layers"] == "unfrozen" else None
        names = set_trainable(model, layers=layers)
        soft = soft_gate_routing(prm["reading"], self.p.k)
        routing = soft if prm["gate"] != "none" else Routing()
        trained = dict(summary=None, curve=[])
        if any(q.requires_grad for q in model.parameters()):
            trained = self._train(unit, model, "task", self.p.k, self.p.task_steps, soft=soft)
        evals = {routing.label(): self.ppl(model, routing)}
        if prm["gate"] != "none":
            evals["dense (same weights)"] = self.ppl(model, Routing())
        return dict(gate=prm["gate"], reading=prm["reading"], position="none", unfrozen_layers=layers, trained=names,
                    gated_layers=prm["gated_layers"], evals=evals, ppl=evals[routing.label()], **trained)


@torch.no_grad()
def hf_gate_f1_layers(model, ids, ks: list[int], p: PretrainedProtocol) -> dict[int, list[float]]:
    """Per k and layer, the attached gates' F1 against the oracle top-k, averaged over the first validation windows
    (f1_batches batches); the mean over layers is the gate's F1."""
    device = next(model.parameters()).device
    t = torch.tensor(ids[: p.f1_batches * p.batch_size * p.context + 1], dtype=torch.long)
    n = (len(t) - 1) // p.context
    x = t[: n * p.context].view(n, p.context).to(device)
    per_batch = []
    for i in range(0, n, p.batch_size):
        with autocast_for(device):
            per_batch.append(captured_gate_f1(model, x[i:i + p.batch_size], ks))
    return {k: [float(np.mean([b[k][layer] for b in per_batch])) for layer in range(len(per_batch[0][k]))]
            for k in ks}


def hf_gate_f1(model, ids, k: int, p: PretrainedProtocol) -> float:
    """The attached gates' mean F1 at k against the oracle top-k, on the first validation windows."""
    return float(np.mean(hf_gate_f1_layers(model, ids, [k], p)[k]))


# -----------------------------------------------------------------------------------------------------------
def cached_ids(tokenizer, split: str, cache: Path) -> list[int]:
    """The bundled corpus's split in the model's tokenizer, cached as .npy (tokenising 7M tokens takes a while)."""
    if cache.is_file():
        return np.load(cache).tolist()
    ids = encode_corpus(tokenizer, "bundled", split)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp.npy")
    np.save(tmp, np.asarray(ids, dtype=np.int32))
    tmp.replace(cache)
    return ids


def reproduce_pretrained(model_path: str, gguf: str | None = None, protocol: str = "compact",
                         out: str | None = None, runs: str | None = None, only: list[str] | None = None,
                         device: str = "auto", progress: bool = True, budget_s: float | None = None,
                         task_steps: int | None = None, reading: str = DEFAULT_READING, report: bool = True,
                         position: str = DEFAULT_POSITION, max_steps: int | None = None) -> dict:
    """Run the selected units that are not done, then the report (report=False leaves REPORT.md alone: `gatelab
    report --suite pretrained` rebuilds it)."""
    suite = pretrained_suite(model_path, gguf, protocol, out=out, runs=runs, device=device, progress=progress,
                             task_steps=task_steps, reading=reading, position=position, max_steps=max_steps)
    status = suite.run(only, budget_s)
    if report:
        write_pretrained_report(suite.out, suite.p)
    return status


def pretrained_suite(model_path: str, gguf: str | None = None, protocol: str = "compact", out: str | None = None,
                     runs: str | None = None, device: str = "auto", progress: bool = True,
                     task_steps: int | None = None, reading: str = DEFAULT_READING, position: str = DEFAULT_POSITION,
                     max_steps: int | None = None) -> PretrainedSuite:
    """The suite on a model, its corpus tokenised (cached in RUNS/tokens). task_steps overrides the protocol's
    training steps of Tables 7-8, max_steps the cap of the units trained until convergence (pos-*,
    table6-VARIANT-*); each unit records what it ran."""
    if protocol not in PROTOCOLS:
        raise GatelabError(f"unknown pretrained protocol {protocol!r}; choose {', '.join(PROTOCOLS)}")
    p = PROTOCOLS[protocol]
    if task_steps is not None:
        p = replace(p, task_steps=task_steps)
    if max_steps is not None:
        if max_steps < 1:
            raise GatelabError(f"--max-steps must be at least 1, got {max_steps}")
        p = replace(p, converge_max_steps=max_steps)
    out, runs = output_folders(out, runs, "pretrained")
    dev = resolve_device(device)
    from transformers import AutoTokenizer
    if not Path(model_path).exists():
        raise GatelabError(f"model {model_path} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(str(model_path), **(dict(gguf_file=gguf) if gguf else {}))
    except Exception as e:  # noqa: BLE001 - missing files, no gguf package...
        raise GatelabError(f"cannot load the tokenizer of {model_path}: {type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
    train_ids = cached_ids(tok, "train", runs / "tokens" / "train.npy")
    val_ids = cached_ids(tok, "validation", runs / "tokens" / "validation.npy")
    name = Path(model_path).name + (f"/{gguf}" if gguf else "")
    return PretrainedSuite(p, lambda: load_pretrained(model_path, gguf, device=dev)[0], train_ids, val_ids, out,
                           runs, name, progress=progress, reading=reading, position=position)
