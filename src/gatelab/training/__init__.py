"""Training: the loop with exact resume (train.py), checkpoints (checkpoint.py), post-hoc gate distillation (distill.py,
block_distill.py), gate files (gate_files.py), data parallelism (distributed.py)."""
