"""Optimizers: plain ask/tell objects with JSON-and-array state (see base.py); registry.py
names them. Empty on purpose: the store reads checkpoints (state.py) without importing every
optimizer's dependencies (cmaes, scipy, Optuna's samplers)."""
