"""Parallelism: the process group and mesh (``distributed``), FSDP2 with activation checkpointing
and compile (``fsdp``), activation offloading (``offload``), storage dtypes and mixed precision
(``precision``), and process-tree lookups (``processes``).

Layer: right above ``modules``; may import modules, batch_layout and torch_private only. Model
code never imports this package.
"""
