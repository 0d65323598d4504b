"""Pretrained weights: safetensors checkpoints read tensor by tensor into (sharded) parameters
(``hf_checkpoint``), a model built on the meta device with the weight sources that fill it
(``pretrained``), LoRA settings and fresh adapters (``lora``), and PEFT adapter folders in and out
(``peft``).

Layer: above ``flops``; may import flops, parallel, modules, batch_layout and torch_private.
Nothing here knows a model family: families hand in their weight maps.
"""
