"""Training checkpoints: their on-disk layout, and exporting them as consolidated model folders."""
