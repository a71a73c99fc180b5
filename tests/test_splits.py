from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from devkit.imageserver import ImageServer
from ml.download import download
from ml.errors import PipelineError
from ml.ingest import ingest
from ml.labels import LABELS
from ml.splits import SPLITS, allocate, assign_splits, make_splits, parse_ratios
from ml.storage import ObjectStore, S3Uri
from tests.helpers import labelled_urls, plain_csv
from tests.test_download import CONFIG


def _images(counts: dict[str, int], duplicates: int = 0) -> pd.DataFrame:
    rows = []
    for label, n in counts.items():
        for i in range(n):
            rows.append({"url": f"http://x/{label}/{i}", "label": label, "sha256": f"{label}-{i}"})
    for j in range(duplicates):  # same picture behind a second URL
        rows.append(
            {"url": f"http://mirror/{j}", "label": rows[j]["label"], "sha256": rows[j]["sha256"]}
        )
    return pd.DataFrame(rows)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (100, [80, 15, 5]),
        (3, [1, 1, 1]),
        (4, [2, 1, 1]),
        (2, [1, 1, 0]),
        (1, [1, 0, 0]),
        (0, [0, 0, 0]),
        (21, [17, 3, 1]),
    ],
)
def test_allocate(n: int, expected: list[int]) -> None:
    assert allocate(n, (0.8, 0.15, 0.05)) == expected


def test_splits_are_stratified() -> None:
    counts = {
        "Positive": 550,
        "Neutral": 270,
        "Negative": 135,
        "Highly positive": 28,
        "Highly negative": 17,
    }
    table = assign_splits(_images(counts), (0.8, 0.15, 0.05), seed=0)
    per = table.groupby(["label", "split"]).size().unstack(fill_value=0)
    for label, n in counts.items():
        assert per.loc[label].sum() == n
        assert abs(per.loc[label, "train"] - 0.8 * n) <= 1
        assert abs(per.loc[label, "valid"] - 0.15 * n) <= 1
        assert per.loc[label, "test"] >= 1


def test_every_class_with_three_images_is_in_every_split() -> None:
    counts = dict.fromkeys(LABELS, 3)
    table = assign_splits(_images(counts), (0.8, 0.15, 0.05), seed=5)
    assert (table.groupby(["label", "split"]).size().unstack() == 1).all().all()


def test_splits_are_deterministic_and_order_free() -> None:
    images = _images({"Positive": 60, "Negative": 30})
    a = assign_splits(images, (0.8, 0.15, 0.05), seed=1).set_index("url")["split"]
    shuffled = images.sample(frac=1.0, random_state=7)
    b = assign_splits(shuffled, (0.8, 0.15, 0.05), seed=1).set_index("url")["split"]
    assert a.sort_index().equals(b.sort_index())
    c = assign_splits(images, (0.8, 0.15, 0.05), seed=2).set_index("url")["split"]
    assert not a.sort_index().equals(c.sort_index())


def test_duplicate_content_never_crosses_splits() -> None:
    images = _images({"Positive": 40, "Neutral": 40}, duplicates=30)
    table = assign_splits(images, (0.8, 0.15, 0.05), seed=3)
    assert (table.groupby("sha256")["split"].nunique() == 1).all()
    assert len(table) == 110


@pytest.mark.parametrize("text", ["0.8,0.2", "0.5,0.5,0.5", "a,b,c", "0,0.5,0.5", "1,-0.5,0.5"])
def test_bad_ratios(text: str) -> None:
    with pytest.raises(PipelineError, match="--ratios"):
        parse_ratios(text)


@pytest.mark.integration
def test_split_stage_end_to_end(
    store_uri: str, store: ObjectStore, tmp_path: Path, image_server: ImageServer
) -> None:
    rows = labelled_urls(
        image_server,
        {"Positive": 20, "Neutral": 10, "Negative": 6, "Highly positive": 3, "Highly negative": 2},
        prefix="split-e2e",
    )
    # Two more URLs serve the same pictures as Positive/0 and Positive/1.
    rows += [
        (
            image_server.url(
                f"split-e2e/copy{i}.jpg", content=f"/split-e2e/Positive/{i}.jpg", label="Positive"
            ),
            "Positive",
        )
        for i in range(2)
    ]
    rows.append((image_server.url("split-e2e/gone.jpg", fault="404"), "Neutral"))
    path = tmp_path / "in.csv"
    path.write_bytes(plain_csv(rows))
    dataset = ingest(str(path), store_uri, store=store).dataset
    download(dataset, CONFIG, store=store)

    done = subprocess.run(
        [sys.executable, "-m", "ml", "split", "--dataset", dataset, "--seed", "4"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    splits = summary["splits"]
    assert set(splits) == set(SPLITS)
    assert sum(sum(c.values()) for c in splits.values()) == 43  # the 404 is left out
    for label in ("Positive", "Neutral", "Negative", "Highly positive"):
        assert all(splits[s][label] >= 1 for s in SPLITS)
    assert summary["groups"] == 41  # two URLs repeat earlier pictures

    table = store.read_parquet(S3Uri.parse(summary["split"]))
    assert (table.groupby("sha256")["split"].nunique() == 1).all()
    assert make_splits(dataset, seed=4, store=store)["splits"] == splits
