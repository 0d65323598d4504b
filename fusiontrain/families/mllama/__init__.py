"""Llama 3.2 Vision (Mllama): the model built from our blocks and its HF weight map (``model``), the
tiled ViT and projection head with its FLOP count (``vision``), and the family with its image
format (``family``)."""
