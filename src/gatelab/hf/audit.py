"""The learned-vs-random audit on a Hugging Face model: a distilled gate against a frozen random gate of the same form."""
from __future__ import annotations

from pathlib import Path

from gatelab.config import Routing
from gatelab.diagnostics.analyze import audit_summary
from gatelab.hf.adapter import attach_gates
from gatelab.hf.evaluate import hf_perplexity
from gatelab.hf.gate_files import load_gates, read_gate_meta


def hf_audit(model, gate_path: str | Path, ids: list[int], k: int, context: int = 512, batch_size: int = 4,
             max_tokens: int = 0, allow_other_base: bool = False, progress: bool = False,
             position: str | None = None) -> dict:
    """`gatelab audit` for a Hugging Face model with saved gates: the learned gates, frozen random gates of the
    same form (the initialisation the learned ones started from: attach_gates with the recorded seed and variant),
    the oracle, fixed random top-k and dense, all under hard top-k at k. position: when given, the gates must be
    of that variant."""
    load_gates(model, gate_path, allow_other_base=allow_other_base, position=position)
    meta = read_gate_meta(gate_path)
    ev = lambda r: hf_perplexity(model, ids, r, context=context, batch_size=batch_size,  # noqa: E731
                                 max_tokens=max_tokens, progress=progress)["ppl"]
    hard = Routing(mode="gate-topk", k=k)
    rows = [dict(model="learned gate", routing=hard.label(), ppl=ev(hard))]
    attach_gates(model, d_gate=int(meta.get("d_gate", 32)), gate="random", seed=int(meta.get("seed", 0)),
                 position=meta["position"])
    rows.append(dict(model="random gate", routing=hard.label(), ppl=ev(hard)))
    for r in (Routing(mode="oracle-topk", k=k), Routing(mode="random-topk", k=k), Routing()):
        rows.append(dict(model="-", routing=r.label(), ppl=ev(r)))
    learned, rand, oracle = rows[0]["ppl"], rows[1]["ppl"], rows[2]["ppl"]
    return dict(rows=rows, summary=audit_summary(k, learned, rand, oracle), gate_meta=meta,
                position=meta["position"])
