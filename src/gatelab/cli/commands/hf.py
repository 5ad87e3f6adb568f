"""The commands on a local Hugging Face causal LM: hf-eval (perplexity under gatelab routings) and hf-distill
(gates trained on the frozen, or partly unfrozen, model)."""
from __future__ import annotations

import sys
import time

import torch

from gatelab.cli.commands.common import finite_result, gate_block_size, print_summary, routings_from_args
from gatelab.config import DEFAULT_POSITION, GatelabError, Routing, soft_gate_routing, write_json
from gatelab.devices import resolve_device
from gatelab.hf import corpus as hf_corpus, gate_files as hf_gate_files
from gatelab.hf.adapter import DEFAULT_BLOCK_POSITION, attach_block_gates, attach_gates, set_trainable
from gatelab.hf.compile import compile_prefill
from gatelab.hf.distill import train_gates
from gatelab.hf.evaluate import hf_perplexity, hf_perplexity_docs
from gatelab.hf.generate import compare_with_dense, greedy
from gatelab.tables import format_table

# load_pretrained and encode_corpus are called through their modules, so that a replacement put there
# (monkeypatch) reaches these commands


def run_hf_eval(args) -> None:
    if args.compile_mode and not args.compile:
        raise GatelabError("--compile-mode sets the mode of --compile; add --compile")
    model, tok = hf_gate_files.load_pretrained(args.model, args.gguf, device=resolve_device(args.device))
    routings = routings_from_args(args, args.context, gate_block_size(args.gate))
    if args.gate:  # before the corpus is tokenised (and its cache written): a refused gate writes nothing
        hf_gate_files.load_gates(model, args.gate, allow_other_base=args.allow_other_base, position=args.position)
    elif args.position:
        raise GatelabError("--position checks the variant of --gate GATES; there is no --gate")
    elif any(r.mode != "dense" for r in routings) or args.compile:
        attach_gates(model, gate="none")
    if args.long_docs:
        tokens = hf_corpus.encode_long_documents(tok, args.context, args.corpus, args.split, args.source)
    else:
        tokens = hf_corpus.encode_corpus(tok, args.corpus, args.split, args.source, context=args.context,
                                       progress=not args.quiet)
    if args.compile:
        mode = args.compile_mode or "default"
        if mode == "reduce-overhead" and next(model.parameters()).device.type != "cuda":
            print("gatelab: note: --compile-mode reduce-overhead replays CUDA graphs, which need a CUDA device; "
                  "on this device it compiles without them", file=sys.stderr)
        compile_prefill(model, mode=mode)
    rows = []
    for r in routings:
        res = finite_result(_perplexity(model, tokens, r, args), f"{args.model} under {r.label()}")
        block = r.is_block
        rows.append(dict(routing=r.mode, k=None if r.mode == "dense" else r.block_k if block else r.k,
                         block_size=r.block_size if block else None, label=r.label(), ppl=res["ppl"], nll=res["nll"],
                         tokens=res["tokens"]))
        if not args.quiet:
            print(f"{r.label():40s} ppl {res['ppl']:.3f}", file=sys.stderr)
    print(format_table(rows, ["routing", "k", "block_size", "ppl", "nll", "tokens"]))
    if args.json:
        _write_eval_json(model, rows, args)


def _perplexity(model, tokens, routing, args) -> dict:
    """hf-eval under one routing: of whole documents (--long-docs), else of the corpus's token stream."""
    if args.long_docs:
        return hf_perplexity_docs(model, tokens, routing, args.context, batch_size=args.batch_size,
                                  max_tokens=args.max_tokens, progress=not args.quiet)
    return hf_perplexity(model, tokens, routing, context=args.context, batch_size=args.batch_size,
                         max_tokens=args.max_tokens, progress=not args.quiet)


def _write_eval_json(model, rows: list[dict], args) -> None:
    dev = next(model.parameters()).device
    write_json(args.json, dict(model=str(args.model), gguf=args.gguf, gate=args.gate, corpus=args.corpus,
                               split=args.split, context=args.context, long_docs=args.long_docs, device=str(dev),
                               device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                               command="gatelab " + " ".join(sys.argv[1:]), results=rows))


def run_hf_distill(args) -> None:
    model, tok = hf_gate_files.load_pretrained(args.model, args.gguf, device=resolve_device(args.device))
    if args.long_docs:  # the train split's documents longer than the context, concatenated
        ids = [t for doc in hf_corpus.encode_long_documents(tok, args.context, args.corpus, "train", args.source)
               for t in doc]
    else:
        ids = hf_corpus.encode_corpus(tok, args.corpus, "train", args.source, context=args.context,
                                      progress=not args.quiet)
    k, position = _attach_distill_gates(model, args)
    unfrozen = set_trainable(model, layers=args.unfreeze_layers or [])
    print(f"training: {', '.join(unfrozen)} ({position} gates)", file=sys.stderr)
    soft = soft_gate_routing(args.reading, args.k)
    summary = train_gates(model, ids, args.out, loss=args.loss, k=k, steps=args.steps, batch_size=args.batch_size,
                          context=args.context, lr=args.lr, seed=args.seed, progress=not args.quiet,
                          soft_routing=soft, eval_every=args.eval_every, patience=args.patience,
                          min_delta=args.min_delta, eval_batches=args.eval_batches, step_f1=not args.no_step_f1,
                          fresh=args.fresh)
    print_summary(summary, args.out)


def _attach_distill_gates(model, args) -> tuple[int, str]:
    """Fresh learned gates for hf-distill: block gates (--block-size), distilled against each layer's pooled
    attention mass, else token gates. Returns the k the objective keeps and the gate variant."""
    if args.block_size:
        if args.loss == "task":
            raise GatelabError("block gates distil with --loss kl or bce")
        position = args.position or DEFAULT_BLOCK_POSITION
        attach_block_gates(model, d_gate=args.d_gate, gate="learned", pool=args.block_pool,
                           block_size=args.block_size, seed=args.seed, position=position)
        return args.block_k, position
    position = args.position or DEFAULT_POSITION
    attach_gates(model, d_gate=args.d_gate, gate="learned", seed=args.seed, position=position)
    return args.k, position


def run_generate(args) -> None:
    """Greedy generation under one routing (and with --compare, beside dense generation)."""
    block_size = args.block_size or gate_block_size(args.gate) or Routing.block_size
    routing = Routing(mode=args.routing, k=args.k, block_size=block_size, block_k=args.block_k).validate()
    try:
        prompt = open(args.prompt_file, encoding="utf-8").read()
    except OSError as e:
        raise GatelabError(f"--prompt-file {args.prompt_file}: {e.strerror}") from None
    model, tok = hf_gate_files.load_pretrained(args.model, args.gguf, device=resolve_device(args.device))
    if args.gate:
        hf_gate_files.load_gates(model, args.gate, allow_other_base=args.allow_other_base)
    else:
        attach_gates(model, gate="none")
    ids = tok(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    if ids.shape[1] == 0:
        raise GatelabError(f"--prompt-file {args.prompt_file} holds no tokens")
    if args.cuda_graphs and not ids.is_cuda:
        raise GatelabError("--cuda-graphs needs a CUDA device (--device cuda)")
    if args.compare:
        result = compare_with_dense(model, ids, routing, args.max_new_tokens, args.cuda_graphs,
                                    args.compile)
        tokens = result["tokens"][0]
        first = result["first_difference"]
        where = "no difference" if first >= args.max_new_tokens else f"first difference at token {first}"
        print(f"{routing.label()}: agreement with dense greedy {result['agreement']:.3f} ({where}), "
              f"perplexity under the dense model {result['ppl_routed']:.3f} "
              f"(dense's own continuation {result['ppl_dense']:.3f})", file=sys.stderr)
    else:
        start, timings = time.perf_counter(), {}
        tokens = greedy(model, ids, routing, args.max_new_tokens, args.cuda_graphs, args.compile, timings)[0].tolist()
        seconds = time.perf_counter() - start  # after .tolist(), which waits for the device
        result = dict(routing=routing.label(), new_tokens=args.max_new_tokens, tokens=[tokens], seconds=seconds,
                      **timings)
        print(f"{routing.label()}: {args.max_new_tokens} new tokens after {ids.shape[1]} in {seconds:.2f} s "
              f"({args.max_new_tokens / seconds:.1f} tokens/s, the prefill, warm-up and any compilation included)",
              file=sys.stderr)
        if timings.get("steady_steps"):
            a, b = timings["window"]
            rate = ids.shape[0] * timings["steady_steps"] / timings["steady_s"]
            print(f"steady decoding: {rate:.1f} tokens/s over steps {a}-{b - 1} (after the warm-up, recordings "
                  f"and compilation: {timings['warm_s']:.2f} s)", file=sys.stderr)
    text = tok.decode(tokens, skip_special_tokens=True)
    print(text)
    if args.json:
        write_json(args.json, dict(result, prompt=prompt, text=text))
