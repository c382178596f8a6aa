"""Networks. ``BasicCNN`` is the tutorial's BasicBlock CNN, layer for layer."""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """conv3x3 -> ReLU -> conv3x3 -> ReLU -> MaxPool2d(2): halves the spatial size."""

    def __init__(self, in_channels: int, out_channels: int, hidden_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden_dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(hidden_dim, out_channels, kernel_size=3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.relu(self.conv2(self.relu(self.conv1(x)))))


class BasicCNN(nn.Module):
    """Three BasicBlocks (3->16->32, 32->64->128, 128->128->256) and fc 4096->2048->256->classes.

    9,457,962 parameters for 10 classes at 32x32. ``image_size`` only sets the first fc's
    input width (256 * (image_size / 8)^2), so larger images work without other changes.
    """

    def __init__(self, num_classes: int = 10, image_size: int = 32) -> None:
        super().__init__()
        if image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8 (three 2x2 poolings), got {image_size}")
        self.block1 = BasicBlock(3, 32, 16)
        self.block2 = BasicBlock(32, 128, 64)
        self.block3 = BasicBlock(128, 256, 128)
        self.fc1 = nn.Linear(256 * (image_size // 8) ** 2, 2048)
        self.fc2 = nn.Linear(2048, 256)
        self.fc3 = nn.Linear(256, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(x)))
        x = torch.flatten(x, start_dim=1)
        return self.fc3(self.relu(self.fc2(self.relu(self.fc1(x)))))
