"""Evaluation: ROUGE-L, FLOPs and compression against baselines."""
