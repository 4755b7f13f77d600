"""Evaluation: methods, the leave-one-out benchmark, diagnostics, analyses and plots."""
