"""Autotuning: search space, timing across ranks, Optuna study, and the flashmoe-tune CLI."""
