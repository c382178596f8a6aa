"""cifarkit: a readable, fast CIFAR-10 training workbench on PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
