"""The training loop (recursive distillation), its recipes (schedules of the related methods), bit-wise
coresets (METHOD.md §3), data-parallel training and the speed settings."""
