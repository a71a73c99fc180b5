"""Near-duplicate benchmark: the perceptual hash's cost per image, and grouping time by size.

Part 1 times ``normalize_image`` (what download does per image) on realistic 500x375 JPEGs,
and ``perceptual_hash`` alone on the decoded picture: the hash's share of the per-image work.
Part 2 times ``ml.dedup.groups`` (pair search plus the union with identical bytes) on hashes of
a given count: random 64-bit hashes in which 5 % of the images are copies a few bits away from
another (as reposted photos are), so both the search and the grouping have work to do.

Usage::

    .venv/bin/python -m benchmarks.dedup_speed                 # 15,613 and 100,000 images
    .venv/bin/python -m benchmarks.dedup_speed --sizes 15613 100000 1000000
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image

from devkit.imageserver import realistic_pool
from ml.dedup import MAX_DISTANCE, groups, perceptual_hash
from ml.imaging import ImageConfig, normalize_image

REPO = Path(__file__).resolve().parent.parent


def hash_cost(images: int = 60) -> None:
    pool = realistic_pool(images)
    config = ImageConfig()
    started = time.perf_counter()
    for data in pool:
        normalize_image(data, config)
    per_image = (time.perf_counter() - started) / len(pool)
    decoded = [Image.open(io.BytesIO(d)).convert("RGB") for d in pool]
    started = time.perf_counter()
    for image in decoded:
        perceptual_hash(image)
    per_hash = (time.perf_counter() - started) / len(decoded)
    print(
        f"per image: normalize_image (decode, verify, re-encode, hash) {per_image * 1e3:.2f} ms; "
        f"perceptual_hash alone {per_hash * 1e3:.3f} ms ({per_hash / per_image:.1%} of it)"
    )


def synthetic(count: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(sha256 stand-ins, hex hashes): random hashes, 5 % of them near copies of another."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**62, count, dtype=np.uint64) * np.uint64(4)
    copies = rng.choice(count, count // 20, replace=False)
    for target in copies:
        bits = rng.choice(64, int(rng.integers(0, MAX_DISTANCE // 2 + 1)), replace=False)
        flips = np.uint64(sum(1 << int(b) for b in bits))
        hashes[target] = hashes[int(rng.integers(0, count))] ^ flips
    return [f"{i:064x}" for i in range(count)], [f"{int(h):016x}" for h in hashes]


def grouping(sizes: list[int]) -> None:
    for count in sizes:
        sha, hashes = synthetic(count)
        started = time.perf_counter()
        ids, pairs = groups(sha, hashes)
        seconds = time.perf_counter() - started
        print(
            f"groups() on {count:>9,} images: {seconds:8.2f} s; {pairs:,} near pairs, "
            f"{len(np.unique(ids)):,} groups (distance <= {MAX_DISTANCE})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[15613, 100000])
    parser.add_argument("--images", type=int, default=60, help="images for the per-image cost")
    args = parser.parse_args()
    hash_cost(args.images)
    grouping(args.sizes)


if __name__ == "__main__":
    main()
