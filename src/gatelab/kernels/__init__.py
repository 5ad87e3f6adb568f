"""Triton kernels, each beside the torch reference it must match (tests run them under Triton's interpreter):

    topk.py        a row's k largest scores without sorting (hard routings; topk-sigmoid's threshold)
    hashing.py     the counter-based hash behind random-topk's fixed subsets
    soft_gate.py   the soft gate as one flash-style kernel each way
    block_mass.py  the pooled attention mass per (query block, key block) (block-gate distillation)
    head_loss.py   the output head's cross-entropy without the logits in memory

They import nothing from the rest of gatelab but its error type.
"""
