"""Training checkpoints: their on-disk layout (manifests, safe files, checksums), DCP parts, the
save / verify / resume manager, base fingerprints, and exporting a checkpoint as a consolidated
model folder (HF, fusiontrain or PEFT).

Layer: above ``config``; may import config, source, families, data, weights, flops, parallel,
modules, batch_layout and torch_private. Never the trainer: what a checkpoint holds is handed to
it as state.
"""
