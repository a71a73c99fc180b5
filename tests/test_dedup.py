"""Near-duplicate grouping: perceptual hashes, the pair search, splits that keep copies together."""

from __future__ import annotations

import io
import itertools
from typing import Any

import numpy as np
import pytest
from PIL import Image

from devkit.imageserver import ImageServer, encode, render_image, variant
from ml.dedup import MAX_DISTANCE, groups, near_pairs, parse_hashes, perceptual_hash, plan
from ml.download import DownloadConfig, download
from ml.imaging import ImageConfig, normalize_image
from ml.ingest import ingest
from ml.labels import LABELS
from ml.layout import DatasetLayout
from ml.splits import make_splits
from ml.storage import ObjectStore, S3Uri
from tests.helpers import plain_csv

LOOPBACK = DownloadConfig(allow_networks=("127.0.0.0/8",))
#: Copies of one picture as the web reposts them: resized, recompressed, slightly cropped.
COPIES = {
    "half size": {"scale": "0.5"},
    "larger": {"scale": "1.6"},
    "quality 30": {"quality": "30"},
    "cropped 1.5 %": {"crop": "0.015"},
    "cropped, resized, recompressed": {"crop": "0.01", "scale": "0.7", "quality": "45"},
}


def _distance(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def _stored_hash(data: bytes) -> str:
    return normalize_image(data, ImageConfig()).phash


def test_copies_are_close_and_other_pictures_far() -> None:
    pictures = [render_image(f"dedup-{i}", label=LABELS[i % 5]) for i in range(40)]
    originals = [_stored_hash(encode(p)) for p in pictures]
    for picture, original in zip(pictures[:15], originals[:15], strict=True):
        for name, query in COPIES.items():
            copy = encode(variant(picture, query), quality=int(query.get("quality", 85)))
            assert _distance(original, _stored_hash(copy)) <= MAX_DISTANCE, name
    closest = min(_distance(a, b) for a, b in itertools.combinations(originals, 2))
    assert closest > MAX_DISTANCE  # 780 pairs of different pictures, same-label tints included


def test_hash_is_computed_from_the_stored_pixels() -> None:
    data = encode(render_image("dedup-stored", width=900, height=700))
    image = normalize_image(data, ImageConfig(max_side=256))
    assert len(image.phash) == 16
    again = perceptual_hash(Image.open(io.BytesIO(image.data)))  # what a backfill computes
    assert _distance(image.phash, again) <= 2


@pytest.mark.parametrize("max_distance", [0, 3, 10, 13])
def test_pair_search_finds_exactly_the_close_pairs(max_distance: int) -> None:
    rng = np.random.default_rng(max_distance)
    hashes = rng.integers(0, 2**62, 2500, dtype=np.uint64) * np.uint64(4)
    hashes |= rng.integers(0, 4, 2500, dtype=np.uint64)
    for _ in range(300):  # plant copies at every distance up to a few bits past the limit
        source, target = rng.integers(0, len(hashes), 2)
        bits = rng.choice(64, int(rng.integers(0, max_distance + 4)), replace=False)
        hashes[target] = hashes[source] ^ np.uint64(sum(1 << int(b) for b in bits))
    distances = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    left, right = np.nonzero(np.triu(distances <= max_distance, 1))
    expected = np.stack([left, right], axis=1)
    found = near_pairs(hashes, max_distance)
    assert len(expected) > 50
    assert np.array_equal(found, expected)


def _brute_force_pairs(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Every pair within ``max_distance``, by comparing all of them (1,000 rows at a time)."""
    found = []
    for start in range(0, len(hashes), 1000):
        rows = hashes[start : start + 1000]
        left, right = np.nonzero(np.bitwise_count(rows[:, None] ^ hashes[None, :]) <= max_distance)
        left += start
        found.append(np.stack([left, right], axis=1)[left < right])
    pairs = np.concatenate(found)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def test_pair_search_matches_brute_force_on_20000_hashes() -> None:
    """Uniform 64-bit hashes (all four 16-bit blocks carry information), a few thousand near
    copies, a cluster of identical hashes: the plan for this size, on one thread and on two."""
    rng = np.random.default_rng(20_000)
    hashes = rng.integers(0, 2**64, 20_000, dtype=np.uint64)
    for target in rng.choice(len(hashes), 3000, replace=False):
        bits = rng.choice(64, int(rng.integers(0, MAX_DISTANCE + 3)), replace=False)
        source = hashes[int(rng.integers(0, len(hashes)))]
        hashes[target] = source ^ np.uint64(sum(1 << int(b) for b in bits))
    hashes[:40] = hashes[40]  # one picture stored 41 times: a bucket with many entries
    expected = _brute_force_pairs(hashes, MAX_DISTANCE)
    assert len(expected) > 2000
    assert np.array_equal(near_pairs(hashes, MAX_DISTANCE, threads=1), expected)
    assert np.array_equal(near_pairs(hashes, MAX_DISTANCE, threads=2), expected)


def test_search_plan_covers_all_64_bits_with_the_pigeonhole_radii() -> None:
    for count in (2, 15_613, 1_000_000):
        for max_distance in (0, 1, 10, 13):
            blocks = plan(count, max_distance)
            assert sum(bits for bits, _ in blocks) == 64
            # hashes that differ by radius + 1 bits in every block are too far apart
            # (a block of radius -1 is never searched: any difference there counts)
            assert sum(radius + 1 for _, radius in blocks) == max_distance + 1
            assert all(radius >= -1 for _, radius in blocks)
    assert plan(1_000_000, MAX_DISTANCE) == [(16, 2), (16, 2), (16, 2), (16, 1)]
    with pytest.raises(ValueError, match="at least 0"):
        near_pairs(np.zeros(3, dtype=np.uint64), -1)


def test_groups_join_bytes_and_pixels_transitively() -> None:
    base = 0x0F0F_0F0F_0F0F_0F0F
    near = base ^ 0b111  # 3 bits from base
    nearer = near ^ (0b111 << 20)  # 3 from near, 6 from base
    far = ~base & 0xFFFF_FFFF_FFFF_FFFF
    sha = ["a", "b", "c", "d", "d", "e"]
    hashes: list[Any] = [f"{h:016x}" for h in (base, near, nearer, far)] + [None, "junk"]
    ids, pairs = groups(sha, hashes, max_distance=4)
    assert ids[0] == ids[1] == ids[2]  # base-near-nearer: a chain is one group
    assert ids[3] == ids[4]  # same bytes, one of them without a hash
    assert len({ids[0], ids[3], ids[5]}) == 3 and pairs == 2
    assert parse_hashes(["zz" * 8, "12", 5])[1].tolist() == [False, False, False]
    # int()'s prefix and underscores and bytes.fromhex's spaces are not hex digits either
    junk = ["0x00000000000001", "0000_00000000001", " 0000000000000ff", "00000000000000ff"]
    assert parse_hashes(junk)[1].tolist() == [False, False, False, True]


@pytest.mark.integration
def test_split_keeps_reposted_copies_together(
    image_server: ImageServer, store: ObjectStore, store_uri: str, tmp_path: Any
) -> None:
    rows = []
    for i in range(40):  # 8 pictures per label, each a different picture
        label = LABELS[i % 5]
        rows.append((image_server.url(f"near/{i}.jpg", label=label), label))
    copied = range(0, 40, 4)  # 10 pictures are reposted as every kind of copy
    for i in copied:
        label = LABELS[i % 5]
        for n, query in enumerate(COPIES.values()):
            copy = f"near/{i}-copy{n}.jpg"
            rows.append(
                (image_server.url(copy, content=f"/near/{i}.jpg", label=label, **query), label)
            )
    path = tmp_path / "near.csv"
    path.write_bytes(plain_csv(rows))
    dataset = ingest(str(path), store_uri, store=store).dataset
    download(dataset, LOOPBACK, store=store)

    summary = make_splits(dataset, seed=1, store=store)
    assert summary["near_duplicate_groups"] == len(copied)
    assert summary["near_duplicate_images"] == len(copied) * (len(COPIES) + 1)
    assert summary["groups"] == 40 and summary["largest_group"] == len(COPIES) + 1
    table = store.read_parquet(S3Uri.parse(summary["split"]))
    assert (table.groupby("group")["split"].nunique() == 1).all()
    assert table["group"].nunique() == 40

    # A manifest written before it had hashes: they are computed from the stored images.
    layout = DatasetLayout.parse(dataset)
    manifest = store.read_parquet(layout.download_manifest).drop(columns="phash")
    store.write_parquet(layout.download_manifest, manifest)
    again = make_splits(dataset, seed=1, store=store)
    assert again["near_duplicate_groups"] == len(copied) and again["splits"] == summary["splits"]
