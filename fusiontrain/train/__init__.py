"""The training loop: the trainer, its step, the loss, non-finite steps, preemption, metrics."""
