"""Gate variants for Hugging Face models: what the gate reads, and how it sees position.

RoPE models route much of their attention by relative position (local windows, previous-token heads), and
a gate reading the layer's input X *before* the rotary embedding cannot see position at all. The variant
(`position`) is a field of the gate (attach_gates(..., position=...), recorded in gate.json, checked on load):

  none  G = (X W_q)(X W_k)^T / sqrt(d_gate): X is the normed input of q/k/v_proj, before RoPE (gatelab's GPT gate,
        gates.BilinearGate; its state dict is unchanged, so gates saved before variants existed load as `none`).
  rope  G = R_t(X W_q + b_q) . R_s(X W_k + b_k) / sqrt(d_gate): the host model's own rotary embedding on the gate's
        query and key, d_gate split into d_gate/2 rotary pairs. The biases b_q, b_k (per head, zero at
        initialisation) are a content-independent part which, rotated, scores pure relative position
        (sum_p a_p cos(theta_p (t - s) + phi_p)), so a gate can express "the previous few tokens" whatever X holds.
  qk    G = (q W_q)(k W_k)^T / sqrt(d_gate): low-rank maps (head_dim -> d_gate) of the model's own queries and keys
        after RoPE (and after Qwen3/Gemma3's q/k norms), per query head; under grouped-query attention each query
        head maps its key-value head's keys. Position comes in exactly as the model's attention sees it.

Frequencies of the `rope` gate: the gate rotates with the cos/sin the layer's attention itself receives
(`position_embeddings`, kept by a forward pre-hook), sub-sampled to d_gate/2 pairs. So every rope type and
long-context scaling (linear, dynamic, YaRN, llama3; `attention_scaling`, which multiplies cos and sin and so
scales G by its square) and per-layer-type rotaries (Gemma3's local and global layers have different bases) come
along without per-family code, at the layer's actual positions (offsets, padding-shifted position_ids). The
model's cos/sin hold head_dim/2 distinct frequencies (HF's rotate_half layout, `cat(freqs, freqs)`, checked on the
first call); pair i of the gate takes frequency round(i * (n - 1) / (d_gate/2 - 1)) of the n, evenly spaced from the
fastest (1 rad/token) to the slowest, so both local and long-range position are represented; a d_gate wider than
head_dim repeats frequencies.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from gatelab.attention.gates import BilinearGate
# The variants, the default one (DEFAULT_POSITION) and their help text are defined in config.py, so that the command
# line lists them without importing torch.
from gatelab.config import DEFAULT_POSITION, POSITION_HELP, POSITIONS, GatelabError  # noqa: E402,F401


def check_position(position: str, d_gate: int | None = None) -> str:
    if position not in POSITIONS:
        raise GatelabError(f"gate position must be one of {', '.join(POSITIONS)}, got {position!r}")
    if position == "rope" and d_gate is not None and d_gate % 2:
        raise GatelabError(f"a rope gate splits d_gate into rotary pairs: d_gate must be even, got {d_gate}")
    return position


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def frequency_index(n_freq: int, n_pairs: int) -> torch.Tensor:
    """Which of the model's n_freq rotary frequencies each of the gate's n_pairs pairs uses (evenly spaced, both
    ends included; repeats when n_pairs > n_freq)."""
    if n_pairs == 1:
        return torch.zeros(1, dtype=torch.long)
    return torch.round(torch.arange(n_pairs, dtype=torch.float64) * (n_freq - 1) / (n_pairs - 1)).long()


def gate_rotary(cos: torch.Tensor, sin: torch.Tensor, n_pairs: int,
                idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate's (cos, sin), (B, T, 2 * n_pairs), sub-sampled from the model's (B, T, rotary_dim); idx: the
    frequency_index, if already on cos's device."""
    if idx is None:
        idx = frequency_index(cos.shape[-1] // 2, n_pairs).to(cos.device)
    c, s = cos[..., idx], sin[..., idx]
    return torch.cat((c, c), dim=-1), torch.cat((s, s), dim=-1)


class RopeGate(nn.Module):
    """The `rope` variant: R_t(X W_q + b_q) . R_s(X W_k + b_k) / sqrt(d_gate), per head."""

    def __init__(self, d_model: int, n_head: int, d_gate: int, init_std: float | None = None,
                 trainable: bool = True):
        super().__init__()
        check_position("rope", d_gate)
        self.d_gate = d_gate
        self.init_std = init_std if init_std is not None else 1.0 / math.sqrt(d_model)
        self.wq = nn.Parameter(torch.empty(n_head, d_model, d_gate), requires_grad=trainable)
        self.wk = nn.Parameter(torch.empty(n_head, d_model, d_gate), requires_grad=trainable)
        self.bq = nn.Parameter(torch.zeros(n_head, d_gate), requires_grad=trainable)
        self.bk = nn.Parameter(torch.zeros(n_head, d_gate), requires_grad=trainable)
        nn.init.normal_(self.wq, std=self.init_std)
        nn.init.normal_(self.wk, std=self.init_std)
        self._layout_checked = False
        self._index: dict = {}  # (rotary_dim, device) -> frequency_index there

    def check_layout(self, cos: torch.Tensor) -> None:
        """HF's rotate_half layout repeats the frequencies: cos = cat(c, c). Checked once (it syncs a GPU)."""
        if self._layout_checked:
            return
        half = cos.shape[-1] // 2
        if cos.shape[-1] % 2 or not torch.allclose(cos[..., :half], cos[..., half:]):
            raise GatelabError("this model's rotary cos/sin are not in the rotate_half layout cat(freqs, freqs); "
                               "the rope gate does not support it (use position 'none' or 'qk')")
        self._layout_checked = True

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C); cos, sin: the layer's (B or 1, T, rotary_dim) -> gate scores (B, H, T, T)."""
        gq, gk = self.factors(x, cos, sin, scaled=False)
        return gq @ gk.transpose(-1, -2) / math.sqrt(self.d_gate)

    def factors(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                scaled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotated (gq, gk), each (B, H, T, d_gate); scaled: gq divided by sqrt(d_gate), so G = gq gk^T."""
        self.check_layout(cos)
        dt = x.dtype
        gq = torch.einsum("btc,hcd->bhtd", x, self.wq.to(dt)) + self.bq.to(dt)[None, :, None]
        gk = torch.einsum("btc,hcd->bhtd", x, self.wk.to(dt)) + self.bk.to(dt)[None, :, None]
        key = (cos.shape[-1], cos.device)
        if key not in self._index:
            self._index[key] = frequency_index(cos.shape[-1] // 2, self.d_gate // 2).to(cos.device)
        c, s = gate_rotary(cos, sin, self.d_gate // 2, self._index[key])
        c, s = c[:, None].to(dt), s[:, None].to(dt)
        gq = gq * c + rotate_half(gq) * s
        gk = gk * c + rotate_half(gk) * s
        return (gq / math.sqrt(self.d_gate) if scaled else gq), gk


class QKGate(nn.Module):
    """The `qk` variant: (q W_q)(k W_k)^T / sqrt(d_gate) on the model's post-RoPE q, k (head_dim -> d_gate)."""

    def __init__(self, d_head: int, n_head: int, d_gate: int, init_std: float | None = None, trainable: bool = True):
        super().__init__()
        self.d_gate = d_gate
        self.init_std = init_std if init_std is not None else 1.0 / math.sqrt(d_head)
        self.wq = nn.Parameter(torch.empty(n_head, d_head, d_gate), requires_grad=trainable)
        self.wk = nn.Parameter(torch.empty(n_head, d_head, d_gate), requires_grad=trainable)
        nn.init.normal_(self.wq, std=self.init_std)
        nn.init.normal_(self.wk, std=self.init_std)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q: (B, H, T, D), k: (B, H, S, D) (key heads repeated to the query heads) -> (B, H, T, S)."""
        gq, gk = self.factors(q, k, scaled=False)
        return gq @ gk.transpose(-1, -2) / math.sqrt(self.d_gate)

    def factors(self, q: torch.Tensor, k: torch.Tensor, scaled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(gq, gk); scaled: gq divided by sqrt(d_gate), so G = gq gk^T."""
        gq = torch.einsum("bhtd,hde->bhte", q, self.wq.to(q.dtype))
        gk = torch.einsum("bhsd,hde->bhse", k, self.wk.to(k.dtype))
        return (gq / math.sqrt(self.d_gate) if scaled else gq), gk


def make_gate(position: str, d_model: int, d_head: int, n_head: int, d_gate: int, init_std: float | None,
              trainable: bool) -> nn.Module:
    check_position(position, d_gate)
    if position == "rope":
        return RopeGate(d_model, n_head, d_gate, init_std, trainable)
    if position == "qk":
        return QKGate(d_head, n_head, d_gate, init_std, trainable)
    return BilinearGate(d_model, n_head, d_gate, init_std, trainable)


def gate_inputs(position: str, x: torch.Tensor | None, rope, query: torch.Tensor, key: torch.Tensor) -> dict:
    """What a gate of this variant reads, from one attention call: the layer input x (before RoPE), the layer's
    (cos, sin), and the model's post-RoPE query and key (key heads repeated to the query heads)."""
    if position == "qk":
        return dict(q=query, k=key)
    if position == "rope":
        if rope is None:
            raise GatelabError("a rope gate needs the layer's rotary embedding, and this attention module was called "
                               "without `position_embeddings` (not a RoPE model, or an unsupported transformers)")
        return dict(x=x, cos=rope[0], sin=rope[1])
    return dict(x=x)


def gate_scores(gate: nn.Module, inputs: dict) -> torch.Tensor:
    """G (B, H, T, S) of any variant from its gate_inputs."""
    if isinstance(gate, QKGate):
        return gate(inputs["q"], inputs["k"])
    if isinstance(gate, RopeGate):
        return gate(inputs["x"], inputs["cos"], inputs["sin"])
    return gate(inputs["x"])


def gate_factors(gate: nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(gq, gk) of any variant, G = gq gk^T, the query side scaled (what the fused soft-gate kernel takes)."""
    if isinstance(gate, QKGate):
        return gate.factors(inputs["q"], inputs["k"])
    if isinstance(gate, RopeGate):
        return gate.factors(inputs["x"], inputs["cos"], inputs["sin"])
    return gate.factors(inputs["x"], scaled=True)
