"""What ``--agreement-weighting`` changes on synthetic data whose label noise follows agreement.

The data imitates what the CrowdFlower export says of itself: three judgments per image, so the
agreement is about 1/3, 2/3 or 1 (10 %, 50 % and 40 % of the images, as in the real CSV), and
the less the annotators agreed, the likelier the given label is wrong. Here a label is replaced
by a neighbouring class (sentiment is ordinal) with probability 0.6 at 1/3, 0.2 at 2/3 and 0.03
at 1. The pictures are :func:`devkit.imageserver.render_image` backgrounds with a tint of their
true class (30 % by default), so the task is learnable but not trivial. Train and valid labels
carry the noise (as a real split's would); the test labels are the true classes.

Each row trains ResNet-18 from random weights with the trainer's own parts (``make_loaders``
over a local image cache, ``make_step``'s objective, ``train_one_epoch``, ``evaluate``), keeps
the epoch with the best (noisy) validation macro-F1 as the trainer does, and reports the clean
test macro-F1 and accuracy there, with and without the weighting, over several seeds. It says
nothing of real photos: there, how often a low-agreement label is wrong is not known.

Usage::

    .venv/bin/python -m benchmarks.agreement_weighting [--train 1500] [--epochs 12] [--seeds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from devkit.imageserver import LABEL_COLOURS, render_image
from ml.labels import LABELS

#: (agreement, share of the images, chance that the given label is wrong)
BANDS = ((1 / 3, 0.10, 0.60), (2 / 3, 0.50, 0.20), (1.0, 0.40, 0.03))
SIDE = 48


def picture(key: str, label: int, tint: float) -> Any:
    """A textured background tinted with its class's colour."""
    from PIL import Image

    base = np.asarray(render_image(key, width=SIDE, height=SIDE, detail=40.0), np.float64)
    colour = np.array(LABEL_COLOURS[label], np.float64)
    return Image.fromarray(((1 - tint) * base + tint * colour).astype(np.uint8), "RGB")


def make_data(folder: Path, counts: dict[str, int], tint: float, seed: int) -> pd.DataFrame:
    """A split manifest over JPEGs written to ``folder`` as ``<sha256>.jpg`` (the trainer's
    image cache, so nothing is read from a store)."""
    rng = np.random.default_rng(seed)
    agreement = np.array([b[0] for b in BANDS])
    share = np.array([b[1] for b in BANDS])
    wrong = np.array([b[2] for b in BANDS])
    rows = []
    for split, count in counts.items():
        truth = rng.integers(0, len(LABELS), count)
        band = rng.choice(len(BANDS), count, p=share)
        flip = (rng.random(count) < wrong[band]) & (split != "test")
        step = np.where(rng.random(count) < 0.5, -1, 1)
        given = np.where(flip, np.clip(truth + step, 0, len(LABELS) - 1), truth)
        given = np.where(flip & (given == truth), truth - step, given)  # an edge class
        for i in range(count):
            key = f"agreement-{seed}-{split}-{i}"
            path = folder / "tmp.jpg"
            picture(key, int(truth[i]), tint).save(path, format="JPEG", quality=90)
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            path.replace(folder / f"{sha}.jpg")
            rows.append(
                {
                    "split": split,
                    "label_index": int(given[i]),
                    "label": LABELS[int(given[i])],
                    "truth": int(truth[i]),
                    "object_key": f"images/{sha}.jpg",
                    "sha256": sha,
                    "agreement": float(agreement[band[i]]),
                }
            )
    return pd.DataFrame(rows)


def train_once(
    table: pd.DataFrame, cache: Path, weighting: bool, seed: int, epochs: int
) -> dict[str, Any]:
    """The trainer's parts on ``table``; clean test figures at the best validation epoch."""
    import torch

    from ml.data import make_loaders
    from ml.evaluate import compute_metrics
    from ml.loop import evaluate, make_step, train_one_epoch
    from ml.model import build_model
    from ml.runtime import Runtime, seed_epoch
    from ml.train_config import TrainConfig
    from ml.transforms import Preprocessing

    torch.manual_seed(seed)
    cfg = TrainConfig(
        split="s3://bench/splits/x/splits.parquet",
        arch="resnet18",
        weights="none",
        epochs=epochs,
        batch_size=32,
        learning_rate=0.05,
        warmup_epochs=0.5,
        image_size=SIDE - 8,
        workers=0,
        seed=seed,
        cache_dir=str(cache),
        agreement_weighting=weighting,
    )
    rt = Runtime(0, 1, 0, torch.device("cpu"))
    model, weights = build_model(cfg.weights, arch=cfg.arch)
    preprocessing = Preprocessing.from_preset(weights.transforms, cfg.image_size)
    loaders = make_loaders(table, "bench", cfg, rt, preprocessing)
    model = model.to(memory_format=torch.channels_last)
    step = make_step(
        model,
        cfg,
        rt,
        len(loaders.train),
        preprocessing.normalizer(rt.device, channels_last=True),
        loaders.class_weights,
    )
    truth = table.loc[table["split"] == "test", "truth"].tolist()
    best: dict[str, Any] = {"valid_macro_f1": -1.0}
    started = time.perf_counter()
    for epoch in range(cfg.epochs):
        seed_epoch(cfg.seed, rt.rank, epoch, loaders.generators)
        model.train()
        train_one_epoch(model, loaders.train, step, cfg, rt)
        valid, _ = evaluate(model, loaders.valid, cfg, rt, step.normalizer)
        if valid["macro_f1"] > best["valid_macro_f1"]:
            _, probs = evaluate(model, loaders.test, cfg, rt, step.normalizer)
            test = compute_metrics(truth, probs.argmax(1).tolist())
            best = {
                "valid_macro_f1": valid["macro_f1"],
                "epoch": epoch + 1,
                "test_macro_f1": test["macro_f1"],
                "test_accuracy": test["accuracy"],
            }
    return best | {"seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=1500, help="training images")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tint", type=float, default=0.3, help="strength of the class signal")
    args = parser.parse_args()
    counts = {"train": args.train, "valid": args.train // 4, "test": args.train // 2}
    results: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as folder:
        cache = Path(folder)
        for seed in range(args.seeds):
            table = make_data(cache, counts, args.tint, seed)
            noisy = table[table["split"] == "train"]
            wrong = float((noisy["label_index"] != noisy["truth"]).mean())
            for weighting in (False, True):
                row = train_once(table, cache, weighting, seed, args.epochs)
                row |= {"seed": seed, "agreement_weighting": weighting, "train_wrong": wrong}
                print(
                    json.dumps(
                        {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
                    )
                )
                results[weighting].append(row)
    print()
    print("| agreement_weighting | clean test macro-F1 (mean ± sd) | clean test accuracy | seeds |")
    print("|---|---|---|---|")
    for weighting, rows in results.items():
        f1 = [r["test_macro_f1"] for r in rows]
        acc = [r["test_accuracy"] for r in rows]
        spread = statistics.stdev(f1) if len(f1) > 1 else 0.0
        print(
            f"| {'on' if weighting else 'off'} | {statistics.mean(f1):.3f} ± {spread:.3f} "
            f"| {statistics.mean(acc):.3f} | {len(rows)} |"
        )
    gains = [
        b["test_macro_f1"] - a["test_macro_f1"]
        for a, b in zip(results[False], results[True], strict=True)
    ]
    print(f"\nper-seed gain in clean test macro-F1: {', '.join(f'{g:+.3f}' for g in gains)}")


if __name__ == "__main__":
    main()
