"""Model FLOPs: analytic counts, their rules, and counting on fake tensors."""
