"""Evaluation: the scoring engine (scoring.py), the trainer's eval sums (loss.py), perplexity figures
(perplexity.py), local task runners (tasks.py) and the lm-eval-harness adapter (harness.py).

It imports the model, checkpoints, data and sampling, never the trainer (the trainer imports it).
See docs/evaluation.md.

    results = scoring.score(params, model_cfg, [(context_ids, continuation_ids), ...], batch_size=32)
"""
