"""Model FLOPs and MFU: the counting rules (``rules``), the per-step count (``count``) and the
count of an encoder no family counts analytically, on fake tensors (``probe``).

Layer: above ``parallel``; may import parallel, modules, batch_layout and torch_private. A family
that counts its encoder analytically gives the encoder module a ``count_flops`` method; this
package asks the module, never the family registry.
"""
