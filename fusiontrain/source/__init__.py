"""The model a run starts from (``model_source.ModelSource``): a family, its weight folders and
settings, and whether they are HF folders or a fusiontrain export (``export`` reads one). The only
place that tells the two apart.

Layer: above ``families``; may import families, data, weights, flops, parallel, modules,
batch_layout and torch_private. ``config`` asks it which keys name a model.
"""
