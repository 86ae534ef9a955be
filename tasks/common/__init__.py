"""What every task shares: the ResNet backbone with swappable downsamplers, the training engine, distributed
set-up, checkpoints, logging and the results pipeline."""
