"""fusiontrain: train deep-fusion multimodal models (a pretrained encoder joined to a pretrained
decoder LLM through cross-attention layers) with FSDP2.

Layout (data flows one way, top to bottom):

- ``fusiontrain.modules``: the model building blocks and ``DeepFusionModel`` (torch only).
- ``fusiontrain.models``: builders that read Hugging Face checkpoints into those blocks.
"""

__version__ = "0.1.0"
