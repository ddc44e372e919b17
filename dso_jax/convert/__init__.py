"""Conversion of PyTorch checkpoints (TRELLIS stage 1, DINOv2) to Flax parameter trees (numpy only), and peft
LoRA files to and from :class:`dso_jax.lora.Overlay` (``peft``); ``files`` holds their atomic file I/O."""
