"""Checkpoint import from (and export to) PyTorch diffusers / transformers formats."""
