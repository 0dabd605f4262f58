"""Training: state (state.py), the step (step.py), optimizers (optim.py), the loop (loop.py), logs (metrics.py)."""
