"""Why the renormalised soft gate failed on CUDA when only the gate trains: a probe of PyTorch's SDPA.

Calls F.scaled_dot_product_attention with a float attn_mask that requires grad while q/k/v do or do not, on every
SDPA backend that accepts the call, and prints whether backward works. gatelab's fix (attention/soft.py's soft_gate_reference)
takes the explicit softmax path exactly when the mask alone needs a gradient.

    python benchmarks/drivers/sdpa_mask_grad_probe.py
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu'}")
    B, H, T, D = 4, 4, 512, 64
    for dtype in (torch.bfloat16, torch.float32):
        for qkv_grad in (True, False):
            for backend in (None, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
                q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=qkv_grad)
                           for _ in range(3))
                bias = torch.randn(B, H, T, T, device=device, dtype=dtype, requires_grad=True)
                name = "default" if backend is None else backend.name
                try:
                    if backend is None:
                        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
                    else:
                        with sdpa_kernel(backend):
                            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
                    out.float().square().sum().backward()
                    result = f"ok, mask grad norm {bias.grad.float().norm():.3g}"
                except RuntimeError as e:
                    result = f"FAILS: {str(e).splitlines()[0][:120]}"
                print(f"{str(dtype):15s} q/k/v requires_grad={qkv_grad!s:5s} backend {name:20s} {result}")


if __name__ == "__main__":
    main()
