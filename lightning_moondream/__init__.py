"""Finetune Moondream by reinforcement learning from PyTorch Lightning."""

__version__ = "0.1.0"
