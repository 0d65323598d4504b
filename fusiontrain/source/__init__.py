"""The model a run starts from."""
