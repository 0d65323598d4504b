"""Inference: load a HF folder, a fusiontrain export or a training checkpoint (``load``), build a
prompt's inputs, and KV-cached greedy or top-p decoding (``generation``); the ``generate`` command.

Layer: above ``plan``; may import everything below it (checkpoint, config, source, families, data,
weights, flops, parallel, modules, batch_layout, torch_private). Training and planning never
import it.
"""
