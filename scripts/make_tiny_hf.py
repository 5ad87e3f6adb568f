"""Write a tiny random-weight Hugging Face causal LM (Llama or Qwen3) with its own small BPE tokenizer, offline.

For smoke runs of gatelab's Hugging Face commands (hf-eval, hf-distill, audit --model, reproduce --suite
pretrained) where no real model can be downloaded:

    python scripts/make_tiny_hf.py OUT_DIR [--family llama|qwen3] [--text FILE]

The tokenizer is a byte-level BPE trained on --text (default: the bundled corpus's first documents), so any
text encodes. The weights are random: perplexities mean nothing, the code paths are what is exercised.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--family", default="llama", choices=("llama", "qwen3"))
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--text", help="training text for the tokenizer (default: the bundled corpus)")
    args = ap.parse_args()
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    if args.text:
        texts = [Path(args.text).read_text(encoding="utf-8")]
    else:
        from gatelab.data import corpus_documents
        texts = [text for _, text in itertools.islice(corpus_documents("bundled"), 200)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    shape = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, head_dim=32,
                 eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, tie_word_embeddings=True)
    cfg = AutoConfig.for_model(args.family, **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    out = Path(args.out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"wrote a tiny {args.family} ({sum(p.numel() for p in model.parameters()):,} parameters, vocabulary "
          f"{len(tok)}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
