"""distkd: knowledge distillation from a stronger teacher (DIST, KD, DKD) in PyTorch."""

__version__ = "0.1.0"
