"""The tutorial's recipe as a plain PyTorch loop: the peer the project's speed and accuracy are compared with.

    python benchmarks/tutorial.py ROOT [--epochs 1] [--batch-size 32] [--seed 0] [--workers 0] [--results DIR]

ROOT is an image-folder tree (ROOT/train/<class>/*, ROOT/test/<class>/*). The recipe, nothing
added: the BasicBlock CNN (cifarkit.nets.models.BasicCNN, 9,457,962 parameters), torchvision's
per-sample transforms in a DataLoader (RandomCrop(32, padding=4), RandomHorizontalFlip,
ToTensor, Normalize by the training images' per-channel mean and std), Adam (lr 1e-3),
cross-entropy, fp32, all training images, no validation split. After each epoch it tests on the
clean test images. Prints a line per epoch, saves docs/results/tutorial-<machine>.json
(benchmarks/results.py) and prints the same figures as one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from cifarkit.nets.models import BasicCNN
from results import add_argument, save


def mean_std(root: str) -> tuple[list[float], list[float]]:
    """Per-channel mean and std over every training pixel, as the tutorial computes them."""
    images = ImageFolder(
        f"{root}/train", transform=v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)])
    )
    x = torch.stack([img for img, _ in images])
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()


def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    right = total = 0
    with torch.inference_mode():
        for x, y in loader:
            right += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    model.train()
    return right / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="image-folder tree with train/<class>/ and test/<class>/")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    add_argument(p)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    mean, std = mean_std(args.root)
    to_input = [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    train = ImageFolder(
        f"{args.root}/train", transform=v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), *to_input])
    )
    test = ImageFolder(f"{args.root}/test", transform=v2.Compose(to_input))
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, num_workers=args.workers)
    test_loader = DataLoader(test, batch_size=256, num_workers=args.workers)

    model = BasicCNN(len(train.classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    epochs: list[dict[str, Any]] = []
    for epoch in range(args.epochs):
        t0, seen = time.perf_counter(), 0
        for x, y in train_loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
            seen += len(y)
        seconds = time.perf_counter() - t0
        epochs.append(
            {
                "epoch": epoch + 1,
                "train_seconds": round(seconds, 1),
                "train_images_per_s": round(seen / seconds, 1),
                "test_acc": round(accuracy(model, test_loader), 4),
            }
        )
        print(
            f"epoch {epoch + 1}: test accuracy {epochs[-1]['test_acc']:.2%}, {epochs[-1]['train_images_per_s']} "
            "images/s",
            flush=True,
        )
    report = {
        "root": args.root,
        "train_images": len(train),
        "batch_size": args.batch_size,
        "seed": args.seed,
        "epochs": epochs,
    }
    save(args.results, f"tutorial-{args.epochs}ep", report)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
