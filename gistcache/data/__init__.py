"""Instruction data shared by training and evaluation: Alpaca-format files, the built-in task set (short and long
families) and k-shot prompts built from rows that name their task (`kshot`)."""
