"""Triton kernels, each beside the torch reference it must match (tests run them under Triton's interpreter):

    topk.py        a row's k largest scores without sorting (hard routings; topk-sigmoid's threshold)
    hashing.py     the counter-based hash behind random-topk's fixed subsets
    soft_gate.py   the soft gate as one flash-style kernel each way
    block_mass.py  the pooled attention mass per (query block, key block) (block-gate distillation)
    block_factors.py  a block gate's pooled, projected factors (block-gate inference)
    block_select.py   the block lists a BlockMask takes, from those factors (block-gate inference)
    block_decode.py   one decoding step's attention over the kept blocks of a KV cache
    head_loss.py   the output head's cross-entropy without the logits in memory

They import nothing from the rest of gatelab but its error type.
"""
