"""Training: the trainer (``trainer``), one step of it shared with the planner (``step``), their
shared setup (``setup``: batch layout, parallel model, step settings), the run's model
(``model``), optimizer and schedule (``optim``), data pipeline (``data``), the chunked loss
(``loss``), non-finite steps (``nonfinite``), preemption (``preemption``) and metrics
(``metrics``).

Layer: above ``checkpoint``; may import checkpoint, config and everything below.
"""
