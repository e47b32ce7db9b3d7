"""Readers of dataset formats and adapters of torchvision datasets into samples."""
