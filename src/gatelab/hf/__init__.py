"""gatelab on Hugging Face causal LMs: the attention adapter (adapter.py, every routing mode through
attention.attend), gate files and model loading (gate_files.py), corpus tokenisation (corpus.py), perplexity
(evaluate.py), post-hoc gate distillation (distill.py) and the learned-vs-random audit (audit.py)."""
