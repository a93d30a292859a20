"""Instruction data shared by training and evaluation: Alpaca-format files and the built-in task set."""
