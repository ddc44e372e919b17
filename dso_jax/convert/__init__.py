"""Conversion of PyTorch checkpoints (TRELLIS stage 1, DINOv2) to Flax parameter trees; numpy only."""
