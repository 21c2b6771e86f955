"""vpd_lightning: Variational Policy Distillation (learning from language feedback) on Lightning."""

__version__ = "0.1.0"
