"""fusiontrain: train deep-fusion multimodal models (a pretrained encoder joined to a pretrained
decoder LLM through cross-attention layers) with FSDP2.

The package is layered; README's Architecture section draws the layers, one line per package, and
``tests/test_layering.py`` holds the code to them. This root module holds only the version, which
every layer may read.
"""

__version__ = "0.1.0"
