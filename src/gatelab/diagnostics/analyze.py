"""Diagnostics of a checkpoint (and optionally a gate): how concentrated attention is, how well the gate
finds the oracle's keys, and whether gradients reach the gate under each routing.

- top-k mass: the attention weight the k largest entries of a row carry (the paper's Figure 1), averaged
  over rows with more than k causal keys (rows with fewer trivially carry all of it);
- entropy ratio: H(A_row) / log(number of causal keys), over rows with at least 2 keys;
- gate F1 against the oracle at each k (precision = recall, both sets have k members);
- the gate's gradient norm under each routing mode (Experiment 2: exactly zero under hard top-k).
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch

from gatelab.attention.gates import BilinearGate
from gatelab.attention.masks import causal_mask
from gatelab.config import ROUTING_MODES, GatelabError, Routing, routing_from_dict, write_json, write_text
from gatelab.data import TokenData
from gatelab.devices import autocast_for
from gatelab.diagnostics.evaluate import perplexity
from gatelab.diagnostics.probes import attention_logits, gate_f1, layer_inputs
from gatelab.tables import format_table


def validation_batches(data: TokenData, context: int, batches: int, batch_size: int):
    chunks = [c for c in data.chunks(context) if c[0].numel() == context][: batches * batch_size]
    return [torch.stack([c[0] for c in chunks[i:i + batch_size]]) for i in range(0, len(chunks), batch_size)], \
        [torch.stack([c[1] for c in chunks[i:i + batch_size]]) for i in range(0, len(chunks), batch_size)]


@torch.no_grad()
def attention_statistics(model, xs: list[torch.Tensor], ks: list[int]) -> list[dict]:
    """Per layer: top-k mass for each k, entropy ratio, and (with a gate) F1 for each k."""
    device = next(model.parameters()).device
    L = len(model.blocks)
    sums = [dict(entropy=0.0, n_entropy=0, **{f"mass@{k}": 0.0 for k in ks}, **{f"f1@{k}": 0.0 for k in ks},
                 n_batches=0) for _ in range(L)]
    for x in xs:
        x = x.to(device)
        T = x.shape[1]
        causal = causal_mask(T, device)
        with autocast_for(device):
            inputs = layer_inputs(model, x)
        for layer, (block, xn) in enumerate(zip(model.blocks, inputs)):
            S = attention_logits(block.attn, xn.float())
            A = torch.softmax(S.masked_fill(~causal, float("-inf")), dim=-1)
            n_keys = torch.arange(1, T + 1, device=device, dtype=torch.float32)
            H = -(A * torch.log(A.clamp_min(1e-30))).sum(-1)  # (B, H, T)
            sums[layer]["entropy"] += float((H[..., 1:] / torch.log(n_keys[1:])).sum())
            sums[layer]["n_entropy"] += H[..., 1:].numel()
            G = block.attn.gate(xn.float()).float() if block.attn.gate is not None else None
            for k in ks:
                if k < T:
                    sums[layer][f"mass@{k}"] += float(A.topk(k, dim=-1).values.sum(-1)[..., k:].mean())
                if G is not None:
                    sums[layer][f"f1@{k}"] += float(gate_f1(S, G, causal, k))
            sums[layer]["n_batches"] += 1
    rows = []
    for layer, s in enumerate(sums):
        n = max(s["n_batches"], 1)
        row = dict(layer=layer, entropy_ratio=s["entropy"] / max(s["n_entropy"], 1))
        for k in ks:
            row[f"top{k}_mass"] = s[f"mass@{k}"] / n
            if model.blocks[layer].attn.gate is not None:
                row[f"gate_f1@{k}"] = s[f"f1@{k}"] / n
        rows.append(row)
    overall = {key: sum(r[key] for r in rows) / len(rows) for key in rows[0] if key != "layer"}
    rows.append(dict(layer="all", **overall))
    return rows


def gate_gradient_norms(model, x: torch.Tensor, y: torch.Tensor, k: int) -> list[dict]:
    """The LM loss's gradient norm w.r.t. the gate parameters under each routing mode."""
    device = next(model.parameters()).device
    params = model.gate_parameters()
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    out = []
    try:
        for mode in ROUTING_MODES:
            routing = Routing(mode=mode, k=min(k, model.cfg.context))
            torch.manual_seed(0)
            with autocast_for(device):
                _, loss = model(x.to(device), y.to(device), routing=routing)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None) or torch.tensor(0.0))
            connected = any(g is not None for g in grads)
            out.append(dict(routing=mode, gate_grad_norm=float(norm), exactly_zero=float(norm) == 0.0,
                            gradient_path=connected))
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return out


def ensure_gate(model, seed: int = 0) -> str:
    """Give a gate-less model a fresh random gate, only so that gradient flow to a gate can be measured.
    Returns a note saying which gate the diagnostics describe."""
    if model.gates():
        return "the checkpoint's own gate"
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    for b in model.blocks:
        b.attn.gate = BilinearGate(model.cfg.d_model, model.cfg.n_head, model.cfg.d_gate).to(device)
    return "a fresh randomly initialised gate (the checkpoint has none); F1 columns describe it"


def concentration_figure(rows: list[dict], ks: list[int], title: str):
    """Figure 1's view of a checkpoint: per layer, the top-k attention mass (% of each row's attention) on the left
    axis, and the entropy ratio H / log(n) (a ratio in [0, 1], not a mass) on its own axis to the right; the legend
    sits above the plot, clear of the bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers = [r for r in rows if r["layer"] != "all"]
    xs = list(range(len(layers)))
    fig, (mass_ax, ent_ax) = plt.subplots(1, 2, figsize=(8, 4), gridspec_kw=dict(width_ratios=[max(len(ks), 1), 1]))
    width = 0.8 / max(len(ks), 1)
    for i, k in enumerate(ks):
        mass_ax.bar([x + i * width for x in xs], [100 * r[f"top{k}_mass"] for r in layers], width,
                    label=f"top-{k} mass")
    mass_ax.set_xticks([x + width * (len(ks) - 1) / 2 for x in xs], [str(r["layer"]) for r in layers])
    mass_ax.set_xlabel("layer")
    mass_ax.set_ylabel("top-k attention mass (% of the row's attention)")
    mass_ax.set_ylim(0, 100)
    mass_ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=max(len(ks), 1), frameon=False)
    ent_ax.bar(xs, [r["entropy_ratio"] for r in layers], 0.6, color="grey")
    ent_ax.set_xticks(xs, [str(r["layer"]) for r in layers])
    ent_ax.set_xlabel("layer")
    ent_ax.set_ylabel("entropy ratio H / log(n)")
    ent_ax.set_ylim(0, 1)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_concentration(rows: list[dict], ks: list[int], path: Path, title: str) -> None:
    import matplotlib.pyplot as plt
    fig = concentration_figure(rows, ks, title)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def analyze(model, data: TokenData, ks: list[int], out_dir: str | Path, batches: int = 4, batch_size: int = 8,
            title: str = "", gate_note: str = "") -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    xs, ys = validation_batches(data, model.cfg.context, batches, batch_size)
    if not xs:
        raise GatelabError(f"the {data.split} split has no full {model.cfg.context}-token chunk to analyse")
    stats = attention_statistics(model, xs, ks)
    grads = gate_gradient_norms(model, xs[0][:2], ys[0][:2], ks[0]) if model.gates() else []
    result = dict(title=title, ks=ks, rows=sum(x.shape[0] for x in xs) * model.cfg.context, layers=stats,
                  gate_gradients=grads, gate=gate_note)
    write_json(out / "analysis.json", result)
    cols = ["layer", "entropy_ratio"] + [f"top{k}_mass" for k in ks] + \
        ([f"gate_f1@{k}" for k in ks] if model.gates() else [])
    md = [f"# Attention analysis: {title}", "", f"{sum(x.shape[0] for x in xs)} validation chunks of "
          f"{model.cfg.context} tokens. Top-k mass over rows with more than k causal keys.", "",
          format_table(stats, cols)]
    if grads:
        md += ["", f"Gate gradient norm of the LM loss under each routing (k={ks[0]}); {gate_note}", "",
               format_table(grads, ["routing", "gate_grad_norm", "exactly_zero", "gradient_path"])]
    write_text(out / "analysis.md", "\n".join(md) + "\n")
    plot_concentration(stats, ks, out / "concentration.png", title)
    return result


# The oracle must beat random top-k by at least this fraction of random's perplexity for a share of the gap between
# them to mean anything: across a smaller gap, evaluation noise gives shares like 2000%.
MIN_ORACLE_GAIN = 0.02


def audit_summary(k: int, learned: float, rand: float, oracle: float) -> dict:
    """How much better the learned gate is than a frozen random one (relative perplexity), and the share of the
    random-to-oracle gap it closes: None (and gap_too_small) unless the oracle beats random by MIN_ORACLE_GAIN."""
    oracle_gain = (rand - oracle) / rand
    too_small = not oracle_gain >= MIN_ORACLE_GAIN
    return dict(k=k, learned_vs_random=(rand - learned) / rand, oracle_vs_random=oracle_gain,
                gap_too_small=too_small,
                random_to_oracle_gap_closed=None if too_small else (rand - learned) / (rand - oracle))


def audit(model, trainer: dict, data: TokenData, k: int, gate_meta: dict | None = None, max_tokens: int = 0,
          batch_size: int = 16, control=None) -> dict:
    """Does the learned router beat a random one? Evaluate the model with its learned gate, with a frozen
    random gate of the same form (the same initialisation the learned gate started from), with the oracle and
    dense, under hard top-k and under the routing it was trained with.

    Swapping the gate inside one co-trained model asks how much these weights rely on their gate. control (a
    model trained the same way with its random gate frozen from the start) asks the paper's Experiment 1
    question instead: did learning the gate beat training with a random one, once Q/K/V have adapted to each?"""

    if not model.gates():
        raise GatelabError("audit needs a model with a gate: a checkpoint trained with model.gate=learned, "
                           "or --gate GATE")
    device = next(model.parameters()).device
    seed = (gate_meta or {}).get("seed", trainer["config"].get("seed", 0))
    # training and distillation both built the model right after manual_seed(seed), gates initialised inside:
    # rebuilding it the same way gives the gate's exact starting point, which we freeze as the random control
    torch.manual_seed(seed)
    init = type(model)(dataclasses.replace(model.cfg, gate="random"))
    random_model = copy.deepcopy(model)
    for block, init_block in zip(random_model.blocks, init.blocks):
        block.attn.gate = init_block.attn.gate.to(device)
    trained = routing_from_dict(trainer["config"]["routing"]) if gate_meta is None else \
        routing_from_dict(gate_meta.get("routing", {}))
    routings = [Routing(mode="gate-topk", k=k)]
    if trained.mode == "soft-gate":
        routings.insert(0, trained)
    if control is not None and not control.gates():
        raise GatelabError("--control must be a model trained with a gate (model.gate=random), e.g. an Experiment 1 "
                           "random-gate run")
    control_name = "control: trained with random gate"
    models = [("learned gate", model), ("random gate", random_model)]
    if control is not None:
        models.append((control_name, control))
    rows = []
    for r in routings:
        for name, m in models:
            torch.manual_seed(0)
            rows.append(dict(model=name, routing=r.label(), ppl=perplexity(m, data, r, batch_size, max_tokens)["ppl"]))
    for r in (Routing(mode="oracle-topk", k=k), Routing(mode="random-topk", k=k), Routing()):
        rows.append(dict(model="-", routing=r.label(), ppl=perplexity(model, data, r, batch_size, max_tokens)["ppl"]))
    by = {(row["model"], row["routing"]): row["ppl"] for row in rows}
    hard = Routing(mode="gate-topk", k=k).label()
    learned, rand, oracle = by[("learned gate", hard)], by[("random gate", hard)], \
        by[("-", Routing(mode="oracle-topk", k=k).label())]
    summary = audit_summary(k, learned, rand, oracle)
    if trained.mode == "soft-gate":
        sl, sr = by[("learned gate", trained.label())], by[("random gate", trained.label())]
        summary["soft_learned_vs_random"] = (sr - sl) / sr
    if control is not None:
        summary["learned_vs_control"] = {r.label(): (by[(control_name, r.label())] - by[("learned gate", r.label())])
                                         / by[(control_name, r.label())] for r in routings}
    return dict(rows=rows, summary=summary)
