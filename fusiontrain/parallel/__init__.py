"""The process group, FSDP2 and activation checkpointing, offloading, precision."""
