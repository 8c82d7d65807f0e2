"""The default run as a plain PyTorch script: the floor `make bench` measures whole runs against.

The same work as `python -m mnist_lit.train` with the defaults, without a framework: read and
normalize MNIST, the train/validation split, the default recipe (the constants below: a ReLU MLP,
AdamW, label smoothing, a OneCycle schedule), validation accuracy after every epoch, a checkpoint
of the best, and the official test set on it. No config, logging, metrics library or
resumability. It exits as the commands do (mnist_lit/speed.py `exit_without_collecting_garbage`),
so whole runs compare the work, not the exit.

    python -m mnist_lit.plain_loop --data ../shared/mnist --out /tmp/plain
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mnist_lit.data import ensure_mnist, load_split
from mnist_lit.mnist import IMAGE_SIZE, MNIST_MEAN, MNIST_SHA256, MNIST_STD, NUM_CLASSES
from mnist_lit.speed import exit_without_collecting_garbage

# The default run's recipe, as `python -m mnist_lit.train` resolves it (tests/test_bench.py checks).
SEED = 42
SPLIT_SEED = 1234
VAL_SIZE = 5000
BATCH_SIZE = 64
EPOCHS = 10
HIDDEN = (128, 64)
LR = 4e-3
WEIGHT_DECAY = 0.1
LABEL_SMOOTHING = 0.1


def accuracy(net: nn.Module, images: Tensor, labels: Tensor) -> float:
    net.eval()
    with torch.no_grad():
        correct = sum(
            (net(images[i : i + 1000]).argmax(1) == labels[i : i + 1000]).sum().item()
            for i in range(0, len(labels), 1000)
        )
    net.train()
    return correct / len(labels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mnist_lit.plain_loop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with the four MNIST files (gzipped or not)")
    parser.add_argument("--out", type=Path, required=True, help="where the checkpoint and metrics.json go")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    raw = args.out / "MNIST" / "raw"
    ensure_mnist(raw, str(args.data), MNIST_SHA256)
    images, labels = load_split(raw, train=True, mean=MNIST_MEAN, std=MNIST_STD)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    val_rows, train_rows = order[:VAL_SIZE], order[VAL_SIZE:]
    train_x, train_y, val_x, val_y = images[train_rows], labels[train_rows], images[val_rows], labels[val_rows]

    net = nn.Sequential(
        nn.Linear(IMAGE_SIZE, HIDDEN[0]), nn.ReLU(), nn.Linear(*HIDDEN), nn.ReLU(), nn.Linear(HIDDEN[1], NUM_CLASSES)
    )
    steps_per_epoch = -(-len(train_y) // BATCH_SIZE)
    optimizer = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=args.epochs * steps_per_epoch)
    best = 0.0
    for epoch in range(args.epochs):
        shuffled = torch.randperm(len(train_y))
        for start in range(0, len(train_y), BATCH_SIZE):
            rows = shuffled[start : start + BATCH_SIZE]
            logits = net(train_x.index_select(0, rows))
            loss = F.cross_entropy(logits, train_y.index_select(0, rows), label_smoothing=LABEL_SMOOTHING)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        val_acc = accuracy(net, val_x, val_y)
        if val_acc > best:
            best = val_acc
            torch.save(net.state_dict(), args.out / "best.pt")
        print(f"epoch {epoch + 1}/{args.epochs}  val/acc {val_acc:.4f}", flush=True)
    net.load_state_dict(torch.load(args.out / "best.pt", weights_only=True))
    test_x, test_y = load_split(raw, train=False, mean=MNIST_MEAN, std=MNIST_STD)
    metrics = {"test/acc": accuracy(net, test_x, test_y), "val/acc_best": best}
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(metrics)


if __name__ == "__main__":
    main()
    exit_without_collecting_garbage()
