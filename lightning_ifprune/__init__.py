"""Influence-function second-order channel pruning (IFSO) for PyTorch Lightning."""

__version__ = "0.1.0"
