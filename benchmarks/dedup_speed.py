"""Near-duplicate benchmark: the perceptual hash's cost per image, and grouping time by size.

Part 1 times ``normalize_image`` (what download does per image) on realistic 500x375 JPEGs,
and ``perceptual_hash`` alone on the decoded picture: the hash's share of the per-image work.
Part 2 times ``ml.dedup.near_pairs`` (the exact search within 10 bits) and ``groups`` (hex
parsing, search, union with identical bytes) on hashes of a given count: uniform 64-bit hashes
in which 5 % of the images are copies a few bits away from another (as reposted photos are),
and, side by side on the same hashes, faiss's exact range search (``benchmarks.faiss_peer``:
the flat index and the binary multi-hash index, all cores), checking it finds the same pairs.

Usage::

    .venv/bin/python -m benchmarks.dedup_speed                 # 15,613 and 100,000 images
    .venv/bin/python -m benchmarks.dedup_speed --sizes 15613 100000 1000000 --peer-limit 600
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from devkit.imageserver import realistic_pool
from ml.dedup import MAX_DISTANCE, groups, perceptual_hash
from ml.imaging import ImageConfig, normalize_image

REPO = Path(__file__).resolve().parent.parent
FAISS = "faiss-cpu==1.15.1"
FAISS_DIR = REPO / ".venv-faiss"


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


def synthetic(count: int, seed: int = 0) -> np.ndarray:
    """Uniform 64-bit hashes, 5 % of them copies of another with up to half the distance
    flipped (as reposted photos are)."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, count, dtype=np.uint64)
    for target in rng.choice(count, count // 20, replace=False):
        bits = rng.choice(64, int(rng.integers(0, MAX_DISTANCE // 2 + 1)), replace=False)
        flips = np.uint64(sum(1 << int(b) for b in bits))
        hashes[target] = hashes[int(rng.integers(0, count))] ^ flips
    return hashes


def ensure_faiss() -> Path:
    """faiss-cpu in its own folder (not a project dependency), installed on first use."""
    if not (FAISS_DIR / "faiss").exists():
        print(f"installing {FAISS} into {FAISS_DIR.name} ...", file=sys.stderr)
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target"]
        subprocess.run([*pip, str(FAISS_DIR), FAISS], check=True)
    return FAISS_DIR


def run_faiss(hashes: np.ndarray, index: str, limit: float, tmp: Path) -> tuple[str, object]:
    """(seconds as text, pairs or None) of one faiss index in its own process."""
    np.save(tmp / "hashes.npy", hashes)
    env = {**os.environ, "PYTHONPATH": str(ensure_faiss())}
    command = [sys.executable, "-m", "benchmarks.faiss_peer", str(tmp / "hashes.npy")]
    command += ["--index", index, "--max-distance", str(MAX_DISTANCE)]
    command += ["--pairs", str(tmp / "pairs.npy")]
    try:
        done = subprocess.run(
            command, env=env, cwd=REPO, capture_output=True, text=True, timeout=limit, check=True
        )
    except subprocess.TimeoutExpired:
        return f"over {limit:.0f} (stopped)", None
    seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
    return f"{seconds:.2f}", np.load(tmp / "pairs.npy")


def grouping(sizes: list[int], peers: bool, limit: float) -> None:
    from ml.dedup import near_pairs, plan

    started = time.perf_counter()
    groups([f"{i:064x}" for i in range(100)], [f"{int(h):016x}" for h in synthetic(100)])
    print(
        f"first groups() in this process (imports scipy, compiles the search or loads its cache): "
        f"{time.perf_counter() - started:.2f} s"
    )
    row("images", "what", "seconds", "found", "same pairs as ours")
    row("---:", "---", "---:", "---:", "---")
    previous: tuple[int, float] | None = None
    for count in sizes:
        hashes = synthetic(count)
        started = time.perf_counter()
        ours = near_pairs(hashes, MAX_DISTANCE)
        search = time.perf_counter() - started
        blocks = " + ".join(f"{bits} bits r{radius}" for bits, radius in plan(count, MAX_DISTANCE))
        growth = ""
        if previous:
            exponent = np.log(search / previous[1]) / np.log(count / previous[0])
            growth = f" (n^{exponent:.2f} since {previous[0]:,})"
        previous = (count, search)
        row(f"{count:,}", f"ours, near_pairs: {blocks}", f"{search:.2f}{growth}", f"{len(ours):,}")
        text = [f"{int(h):016x}" for h in hashes]
        started = time.perf_counter()
        ids, _ = groups([f"{i:064x}" for i in range(count)], text)
        seconds = f"{time.perf_counter() - started:.2f}"
        row(
            f"{count:,}",
            "ours, groups() (parse, search, union)",
            seconds,
            f"{ids.max() + 1:,} groups",
        )
        for index in ("flat", "multihash") if peers else ():
            with tempfile.TemporaryDirectory() as tmp:
                took, theirs = run_faiss(hashes, index, limit, Path(tmp))
            if theirs is None:
                row(f"{count:,}", f"{FAISS} {index}", took, "-", "-")
            else:
                same = "yes" if np.array_equal(theirs, ours) else "NO"
                row(f"{count:,}", f"{FAISS} {index}", took, f"{len(theirs):,}", same)


def row(*cells: str) -> None:
    print("| " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[15613, 100000])
    parser.add_argument("--images", type=int, default=60, help="images for the per-image cost")
    parser.add_argument("--skip-faiss", action="store_true", help="ours only")
    parser.add_argument(
        "--peer-limit", type=float, default=300, help="seconds before a faiss run is stopped"
    )
    args = parser.parse_args()
    hash_cost(args.images)
    grouping(args.sizes, not args.skip_faiss, args.peer_limit)


if __name__ == "__main__":
    main()
