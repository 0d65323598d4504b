"""Loading a model for inference, and generation."""
