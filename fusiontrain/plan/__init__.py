"""Sizing a run before it is queued (``plan``, ``train --dry-run``): the trainer's own step traced
on fake tensors over a fake process group (``trace``), the memory tracker it runs under
(``memory``), and the per-device memory and step-time report (``planner``).

Layer: above ``train``; may import train (its step and setup, so that it traces what the trainer
runs) and everything below.
"""
