"""gatelab on Hugging Face causal LMs: the attention adapter (adapter.py, every routing mode through
attention.attend), gate files and model loading (gate_files.py), corpus tokenisation (corpus.py), perplexity
(evaluate.py), post-hoc gate distillation (distill.py) and the learned-vs-random audit (audit.py)."""
from gatelab.hf.adapter import attach_block_gates, attach_gates, set_trainable
from gatelab.hf.audit import hf_audit
from gatelab.hf.corpus import encode_corpus, encode_long_documents
from gatelab.hf.distill import train_gates
from gatelab.hf.evaluate import hf_perplexity, hf_perplexity_docs
from gatelab.hf.gate_files import load_gates, load_pretrained, read_gate_meta, save_gates

__all__ = ["attach_block_gates", "attach_gates", "encode_corpus", "encode_long_documents", "hf_audit", "hf_perplexity",
           "hf_perplexity_docs", "load_gates", "load_pretrained", "read_gate_meta", "save_gates", "set_trainable",
           "train_gates"]
