"""convtune trainers: factory-built optimizers, LR schedules, and the ConvNeXtV2 finetune loop run by Ray Train."""
