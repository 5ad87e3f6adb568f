"""What a trained model and its gates do: perplexity under any routing (evaluate), attention concentration, gate F1
and gradients, the learned-vs-random audit (analyze), and block routing's causality check (causality)."""
