"""The block absorption ablation's section of a reproduction report (beyond the paper: its section 6.1 leaves open
whether block-level selection is absorbed like token-level selection)."""
from __future__ import annotations

from dataclasses import dataclass

from gatelab.config import DEFAULT_READING
from gatelab.diagnostics.causality import future_token_influence
from gatelab.reproduce.report.stats import of_differences
from gatelab.reproduce.report.verdicts import Verdict, diverged, evaluation, mean_std, ms, num

_TITLE = "## Block routing: absorbed like token routing?"


@dataclass
class _Measured:
    """The block ablation's settings and numbers, read once from the protocol and the unit results."""
    bs: int  # block size
    bk: int  # earlier key blocks kept
    reading: str  # the soft block gate's reading
    steps: int  # of the end-to-end runs
    context: int
    soft: list[str]  # the end-to-end soft block gate units
    learned: list  # their perplexities: learned / frozen random gate, under the soft gate and under hard top-k
    random_: list
    hard_l: list
    hard_r: list
    oracle: list  # trained under the oracle's blocks
    L: tuple | None  # mean and std of learned, random_ and oracle
    Rd: tuple | None
    O: tuple | None
    bdense: float | None  # the dense run at the block protocol's steps
    tok_l: dict | None  # Experiment 1 under the same reading (seed 0): learned and random soft gate, and dense
    tl: float | None
    tr: float | None
    tdense: float | None
    grad: list  # max gradient norms of the learned runs
    on_dense: dict | None  # post hoc on the frozen dense checkpoint: oracle, random, the KL-distilled block gate
    post: dict | None
    o: float | None
    rnd: float | None
    g: float | None


def _measure(R: dict, protocol, names: list[str]) -> _Measured:
    bs, bk = getattr(protocol, "block_size", 32), getattr(protocol, "block_k", 2)
    reading = getattr(protocol, "block_reading", DEFAULT_READING)
    steps = getattr(protocol, "block_steps", None) or protocol.steps
    context = (protocol.model or {}).get("context", 512)
    soft = [n for n in names if n.startswith("block-soft-")]
    learned = [evaluation(R[n], "block-soft") for n in soft if "-learned-" in n]
    random_ = [evaluation(R[n], "block-soft") for n in soft if "-random-" in n]
    hard_l = [evaluation(R[n], "block-gate") for n in soft if "-learned-" in n]
    hard_r = [evaluation(R[n], "block-gate") for n in soft if "-random-" in n]
    oracle = [evaluation(R[n], "block-oracle") for n in names if n.startswith("block-oracle-s")]
    L, Rd, O = mean_std(learned), mean_std(random_), mean_std(oracle)
    bdense = evaluation(R.get("block-dense") or R.get("dense") or R.get("block-on-dense"), "dense")
    # the token-level Experiment 1 under the same soft reading, where this report has it (seed 0)
    tok_l = R.get("exp1-soft-learned-s0") if reading == "topk-sigmoid" else R.get(f"exp1-{reading}-learned-s0")
    tok_r = R.get("exp1-soft-random-s0") if reading == "topk-sigmoid" else R.get(f"exp1-{reading}-random-s0")
    tl, tr, tdense = evaluation(tok_l, "soft-gate"), evaluation(tok_r, "soft-gate"), evaluation(R.get("dense"), "dense")
    grad = [R[n].get("max_grad_norm") for n in soft if "-learned-" in n and R[n].get("max_grad_norm") is not None]
    on_dense = R.get("block-on-dense")
    post = R.get("block-posthoc-kl")
    o, rnd = evaluation(on_dense, "block-oracle"), evaluation(on_dense, "block-random")
    g = evaluation(post, "block-gate")
    return _Measured(bs, bk, reading, steps, context, soft, learned, random_, hard_l, hard_r, oracle, L, Rd, O, bdense,
                     tok_l, tl, tr, tdense, grad, on_dense, post, o, rnd, g)


def _gap(rnd, lrn):
    return "-" if not rnd or not lrn else f"{100 * (rnd - lrn) / rnd:+.1f}%"


def _closed(rnd, lrn, ref):
    if not rnd or not lrn or not ref or rnd - ref <= 0.02 * ref:
        return "-"
    return f"{100 * (rnd - lrn) / (rnd - ref):.1f}%"


def _end_to_end_table(m: _Measured) -> list[str]:
    """The section's opening paragraph and the end-to-end table, block level beside token level."""
    bs, bk, L, Rd, tl, tr = m.bs, m.bk, m.L, m.Rd, m.tl, m.tr
    return ["", _TITLE, "",
            f"Not in the paper (its section 6.1 leaves open whether block-level selection is absorbed). Blocks of "
            f"{bs} tokens; each query block keeps its diagonal block and its {bk} best earlier key blocks (at most "
            f"{bs * (bk + 1)} keys per query, of {m.context}). End-to-end runs: {m.steps:,} steps; soft block gate "
            f"reading `{m.reading}` (the block analogue of the token soft gate: attention reweighted by a sigmoid of "
            f"the block gate's scores, centred on the score of the query block's k-th best earlier block); a "
            f"learned block gate against the same block gate frozen at its initialisation, and a model trained "
            f"under the oracle's blocks (top-{bk} by pooled attention mass). Token level: Experiment 1 under the "
            f"same reading (seed 0), where this report has it.",
            "", "| condition | block level | token level (Exp. 1) |", "|---|---|---|",
            f"| learned soft gate ({len(m.learned)} seeds) | {ms(L)} | {num(tl)} |",
            f"| frozen random soft gate ({len(m.random_)} seeds) | {ms(Rd)} | {num(tr)} |",
            f"| (random - learned) / random | {_gap(Rd and Rd[0], L and L[0])} | {_gap(tr, tl)} |",
            f"| share of the random-to-dense gap the learned gate closes | "
            f"{_closed(Rd and Rd[0], L and L[0], m.bdense)} | {_closed(tr, tl, m.tdense)} |",
            f"| max gradient norm of the learned runs | {num(max(m.grad) if m.grad else None, 1)} | "
            f"{num(m.tok_l and m.tok_l.get('max_grad_norm'), 1)} |",
            f"| same models, hard top-{bk} blocks of their own gate: learned / random | "
            f"{ms(mean_std(m.hard_l))} / {ms(mean_std(m.hard_r))} | - |",
            f"| trained under the oracle's blocks ({len(m.oracle)} seeds) | {ms(m.O)} | - |",
            f"| dense ({m.steps:,} steps) | {num(m.bdense)} | {num(m.tdense)} |"]


def _posthoc_table(m: _Measured) -> list[str]:
    """A block gate distilled post hoc on the frozen dense checkpoint, beside the oracle's and random blocks."""
    return ["", "Post-hoc: a block gate distilled with KL against the pooled attention mass of each block row, on "
                "the frozen dense checkpoint, deployed as hard top-k blocks, beside the oracle's and a fixed random "
                "block selection on the same checkpoint.", "",
            "| routing on the dense checkpoint | perplexity |", "|---|---|",
            f"| dense | {num(evaluation(m.on_dense, 'dense'))} |",
            f"| block-oracle (top-{m.bk} by pooled mass) | {num(m.o)} |",
            f"| post-hoc KL block gate (block F1 {num(m.post and m.post.get('val_f1'), 3)}) | {num(m.g)} |",
            f"| block-random (fixed) | {num(m.rnd)} |",
            f"| gap closed: (random - gate) / (random - oracle) | {_closed(m.rnd, m.g, m.o)} |"]


def _leak_paragraph(leak: dict[str, float]) -> list[str]:
    """Where a block routing reads later tokens of the query's own block: why the end-to-end rows test no
    absorption (nothing when every routing is causal)."""
    if not any(v > 0 for v in leak.values()):
        return []
    return ["", "**Not causal, so not a test of absorption.** Block selection pools each query block over all of "
                "its tokens, so the blocks a query keeps (and, for the soft gate, their weights) depend on later "
                "tokens of its own block. Measured by `blocks.future_token_influence` (a tiny random GPT, blocks "
                "of 8, token 45 replaced, largest change of the hidden states at positions 40-44): "
            + ", ".join(f"{m} {v:.3g}" for m, v in leak.items()) + " (dense and block-random: 0). A model "
            "trained end to end through such a gate can read the future through it: the learned soft block "
            "gate's perplexity below the dense model's, and its collapse under hard selection, are that leak, "
            "not routing. The post-hoc rows on the frozen dense model leak only through which blocks are kept."]


def _verdict(R: dict, m: _Measured, leaky: list[str]) -> tuple[list[str], Verdict | None]:
    """The verdict (None until both arms ran) and, when it judges absorption, the paired paragraph under it."""
    L, Rd, soft = m.L, m.Rd, m.soft
    learned_runs = [R[n] for n in soft if "-learned-" in n]
    pairs = [(R[f"block-soft-random-s{s}"], R[f"block-soft-learned-s{s}"]) for s in range(len(soft))
             if f"block-soft-random-s{s}" in R and f"block-soft-learned-s{s}" in R]
    rel = of_differences([(evaluation(r, "block-soft") - evaluation(lr, "block-soft")) / evaluation(r, "block-soft")
                          for r, lr in pairs])
    if not (L and Rd):
        return [], None
    if leaky:
        measured = (f"the block selection sees later tokens of the query block ({', '.join(leaky)}), so the "
                    f"end-to-end learned soft block gate ({L[0]:.2f}, below dense {num(m.bdense)}) exploits a leak; a "
                    f"causal block selection is needed before this ablation can say anything about absorption")
        return [], Verdict("block", "Block routing (beyond the paper)", {}, measured, soft)
    facts = dict(L=L[0], R=Rd[0], rel=rel, diverged=any(diverged(r) for r in learned_runs))
    better = sum(d > 0 for d in rel.diffs)
    measured = (f"end to end, the learned soft block gate ends at {L[0]:.2f} vs {Rd[0]:.2f} for the frozen random one; "
                f"(random - learned) / random {rel.describe(100, '%', 1)}; the learned gate is better in {better} of "
                f"{rel.n} paired seeds (paper, token level: +2.2%)")
    tl, tr, g, o, rnd = m.tl, m.tr, m.g, m.o, m.rnd
    if tl and tr:
        measured += f"; token level under the same reading {100 * (tr - tl) / tr:+.1f}% (seed 0)"
    if g and o and rnd:
        measured += (f"; post hoc on the dense model a KL block gate deploys at {g:.2f} (oracle {o:.2f}, "
                     f"random {rnd:.2f})")
    hard = of_differences([(evaluation(r, "block-gate") - evaluation(lr, "block-gate")) / evaluation(r, "block-gate")
                           for r, lr in pairs])
    lines = ["", f"Paired over seeds, (random - learned) / random: under the soft gate {rel.describe(100, '%', 1)}; "
                 f"the same models under hard top-{m.bk} blocks of their own gate {hard.describe(100, '%', 1)}."]
    return lines, Verdict("block", "Block routing (beyond the paper)", facts, measured, soft,
                          words={"reproduced": "absorbed", "not reproduced": "not absorbed"})


def section(R: dict, protocol) -> tuple[list[str], Verdict | None]:
    """The block absorption ablation: its tables, and the verdict (None until both arms ran)."""
    names = [n for n in R if R[n].get("experiment") == "block"]
    if not names:
        return ["", _TITLE, "", "not run (`gatelab reproduce --only block`)"], None
    m = _measure(R, protocol, names)
    leak = {name: future_token_influence(name, m.reading) for name in ("block-soft", "block-gate", "block-oracle")}
    lines = _end_to_end_table(m) + _posthoc_table(m) + _leak_paragraph(leak)
    more, verdict = _verdict(R, m, [name for name, v in leak.items() if v > 0])
    return lines + more, verdict
