"""What the data-quality additions cost, per 1,000 images, on this machine.

- agreement bands: the per-band metrics of 1,000 test images (``ml.evaluate.band_metrics``);
- likely label errors: ranking 1,000 held-out images (``ml.quality.label_issues``), plus the
  one extra evaluation pass over the valid split that feeds it (the network's forward pass);
- drift: the label-mix test and the feature test of a 1,000-image batch against 1,000
  reference images with ResNet-152's 2,048 features (``ml.drift.check_drift``), plus the
  forward pass over the reference images the first time a version is checked (then kept).

The forward pass is timed on ResNet-152 with random weights at the training's default image
size, on this machine's CPU (a GPU does it in a small fraction of the time). Prints one JSON
line per item and a Markdown table.

Usage::

    .venv/bin/python -m benchmarks.quality_cost [--forward-images 32] [--image-size 224]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from ml.drift import check_drift
from ml.evaluate import band_metrics
from ml.labels import LABELS
from ml.quality import label_issues
from ml.serving import probability_column

N = 1000


def timed(work: Callable[[], Any], repeat: int = 3) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of the fastest of ``repeat`` runs."""
    best = (float("inf"), float("inf"))
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        work()
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best


def held_out(rng: np.random.Generator) -> pd.DataFrame:
    probs = rng.dirichlet(np.ones(len(LABELS)), N)
    frame = pd.DataFrame(
        {
            "url": [f"https://example.com/{i}.jpg" for i in range(N)],
            "sha256": [f"{i:064x}" for i in range(N)],
            "split": "test",
            "label_index": rng.integers(0, len(LABELS), N),
            "agreement": rng.choice([0.3333, 0.6667, 1.0], N),
        }
    )
    for j, label in enumerate(LABELS):
        frame[probability_column(label)] = probs[:, j]
    return frame


def forward_seconds(images: int, size: int) -> tuple[float, float]:
    """Seconds per 1,000 images of ResNet-152's forward pass on the CPU (wall, CPU)."""
    import torch

    from ml.model import architecture

    network = architecture("resnet152", len(LABELS)).eval()
    batch = torch.rand(images, 3, size, size)
    with torch.inference_mode():
        network(batch[:2])  # warm-up
        wall, cpu = timed(lambda: network(batch), repeat=1)
    return wall * N / images, cpu * N / images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forward-images", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    frame = held_out(rng)
    probs = frame[[probability_column(label) for label in LABELS]].to_numpy()
    labels = [LABELS[i] for i in probs.argmax(1)]
    batch, reference = rng.normal(0, 1, (N, 2048)), rng.normal(0, 1, (N, 2048))
    rows = [
        (
            "agreement bands (metrics per band)",
            timed(lambda: band_metrics(frame["agreement"], frame["label_index"], probs)),
        ),
        ("likely label errors (ranking)", timed(lambda: label_issues(frame))),
        (
            "drift tests (label mix, MMD with 500 permutations)",
            timed(lambda: check_drift(labels, batch, labels, reference), repeat=1),
        ),
        (
            f"ResNet-152 forward pass, {args.image_size} px, CPU (the valid pass; the drift "
            "reference, once per version)",
            forward_seconds(args.forward_images, args.image_size),
        ),
    ]
    print("| addition | wall s per 1,000 images | CPU s per 1,000 images |")
    print("|---|---|---|")
    for name, (wall, cpu) in rows:
        print(json.dumps({"item": name, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}))
        print(f"| {name} | {wall:.3f} | {cpu:.3f} |")


if __name__ == "__main__":
    main()
