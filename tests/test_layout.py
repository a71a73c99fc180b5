"""ml/layout.py names every store key, and parses the URIs it produces."""

from __future__ import annotations

import re

import pytest

from ml.errors import PipelineError
from ml.layout import CheckpointLayout, DatasetLayout, SplitLayout, StoreLayout, part_range
from ml.statuses import DESCRIPTIONS, Status
from tests.conftest import REPO

ROOT = "s3://bucket/prefix"


def test_uris_round_trip() -> None:
    dataset = DatasetLayout.parse(f"{ROOT}/datasets/ds-1")
    split = dataset.split("seed0-80-15-5")
    assert str(split.manifest) == f"{ROOT}/datasets/ds-1/splits/seed0-80-15-5/splits.parquet"
    parsed = SplitLayout.parse(str(split.manifest))
    assert parsed == split and parsed.dataset.uri == dataset.uri
    part = dataset.download_part(500, 1000, "x.parquet")
    assert part_range(part.key) == (500, 1000) and part_range(dataset.records.key) is None
    assert str(dataset.training("abc")) == f"{ROOT}/datasets/ds-1/training/abc"
    store = StoreLayout.parse(ROOT)
    assert str(store.run_predictions("r")).startswith(f"{ROOT}/runs/r-")
    assert store.image("ab" * 32) == dataset.image("ab" * 32)
    checkpoint = CheckpointLayout(store.run_training("r"))
    assert CheckpointLayout.best_epoch(checkpoint.best(7).key) == 7
    assert CheckpointLayout.best_epoch(checkpoint.last.key) is None
    # what the audit trail reads back: the manifests, splits and outputs it finds by listing
    from ml.layout import is_run_predictions, is_split_manifest, manifest_dataset

    assert manifest_dataset("bucket", dataset.download_manifest.key) == dataset
    assert manifest_dataset("bucket", dataset.records.key) is None
    assert is_split_manifest(split.manifest.key) and not is_split_manifest(split.summary.key)
    assert is_run_predictions(store.run_predictions("r").key)
    assert not is_run_predictions(split.manifest.key)
    assert str(store.kept_split("m", 3)) == f"{ROOT}/audit/lineage/m/v3-split.parquet"
    assert str(store.alias_ledger("m")) == f"{ROOT}/audit/aliases/m"


@pytest.mark.parametrize(
    "uri",
    [
        f"{ROOT}/datasets/ds-1/records.parquet",
        f"{ROOT}/splits/x/splits.parquet",
        "s3://b/splits.parquet",
    ],
)
def test_a_uri_of_another_kind_is_a_clear_error(uri: str) -> None:
    with pytest.raises(PipelineError, match="is not a split URI"):
        SplitLayout.parse(uri)


KEY_LITERALS = re.compile(
    r"""["'](records|rejected|manifest|splits)\.(parquet|json)["']|"""
    r"""["']/?(splits|runs|training|downloads)/|"""
    r"""["'](last\.pt|result\.json|dataset\.json)["']|best-e\{"""
)


def test_no_other_module_builds_store_keys() -> None:
    offenders = []
    for path in sorted((REPO / "ml").glob("*.py")):
        if path.name == "layout.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if KEY_LITERALS.search(line) and not line.lstrip().startswith(("#", '"', "'")):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == []


def test_statuses_are_documented_once_and_everywhere() -> None:
    readme = (REPO / "README.md").read_text()
    table = dict(re.findall(r"^\| `([a-z_]+)` \| (.+) \|$", readme, re.M))
    assert {s.value: DESCRIPTIONS[s] for s in Status} == {s.value: table[s.value] for s in Status}
    assert set(DESCRIPTIONS) == set(Status)


def test_every_per_item_failure_becomes_its_status() -> None:
    """A refused fetch (FetchError) and a refused image (ImageRejected) are both ``Rejected``:
    each becomes its own manifest status, never an internal error, and nothing is stored."""
    from ml.download import _Worker
    from ml.fetch import FetchError, FetchResponse
    from ml.forget import Forgotten
    from ml.imaging import ImageConfig, ImageRejected
    from ml.layout import DatasetLayout
    from ml.statuses import Rejected
    from ml.uri import S3Uri

    assert issubclass(FetchError, Rejected) and issubclass(ImageRejected, Rejected)

    class Fetcher:
        def fetch(self, url: str) -> FetchResponse:
            if "gone" in url:
                raise FetchError(Status.HTTP_ERROR, "HTTP 404", http_status=404)
            return FetchResponse(b"<html>not a picture</html>", 200, url, 1)

    class Store:
        def put_bytes(self, *args: object, **kwargs: object) -> bool:
            raise AssertionError("a refused item must not be stored")

    layout = DatasetLayout(S3Uri("b", "p"), "ds-0")
    nothing = Forgotten({}, {})
    worker = _Worker(Fetcher(), Store(), layout, ImageConfig(), nothing)  # type: ignore[arg-type]
    rows = [
        worker({"url": f"http://h.example/{name}.jpg", "id": name, "label": "Neutral", "row": 1})
        for name in ("gone", "page")
    ]
    assert [(r["status"], r.get("http_status")) for r in rows] == [
        (Status.HTTP_ERROR, 404),
        (Status.NOT_IMAGE, 200),
    ]


def test_the_readme_lists_the_manifest_columns_as_the_code_has_them() -> None:
    from ml.download import MANIFEST_COLUMNS

    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"`{', '.join(MANIFEST_COLUMNS)}`" in readme
