"""Pure-PyTorch references: the CPU path and the oracle every kernel is tested against."""
