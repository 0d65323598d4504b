"""Pretrained weights: safetensors checkpoints, tensor routes, and LoRA settings."""
