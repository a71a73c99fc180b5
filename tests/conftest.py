"""Shared fixtures: a real S3 endpoint (moto server) and the fault-injecting image server.

A process-wide audit hook refuses any socket connection to an address outside loopback, so no
test can send a packet off this machine even by mistake; ``scripts/test`` additionally runs the
suite inside a network namespace that has only loopback.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devkit.imageserver import ImageServer
from devkit.servers import local_s3
from ml.labels import LABELS
from ml.storage import ObjectStore, S3Uri
from tests.helpers import labelled_urls, plain_csv, small_config

REPO = Path(__file__).resolve().parent.parent

# Airflow reads its configuration once, at import: point it at a throwaway home before any test
# imports it (the DAG tests migrate that database themselves).
if "AIRFLOW_HOME" not in os.environ:
    os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="airflow-home-")
    atexit.register(shutil.rmtree, os.environ["AIRFLOW_HOME"], ignore_errors=True)
os.environ.update(
    {
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    }
)
REAL_CSV = REPO.parent / "shared" / "data" / "image-Sentiment-polarity-DFE.csv"

#: Fixtures that start a server (S3, the image server, MLflow) or Airflow: a test that uses one,
#: directly or through another fixture, is marked ``integration`` (pyproject.toml's meaning).
SERVER_FIXTURES = frozenset(
    {"s3_endpoint", "image_server", "mlflow_server", "airflow_db", "topology"}
)
#: Fixtures that train a model: a test that uses one is marked ``slow`` (``-m "not slow"``
#: must skip every training).
TRAINING_FIXTURES = frozenset({"trained", "audited"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The markers say what a test needs: collection fails on a test whose fixtures start
    servers without ``integration``, or train without ``slow``."""
    wrong = []
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        marks = {mark.name for mark in item.iter_markers()}
        for fixtures, marker in ((SERVER_FIXTURES, "integration"), (TRAINING_FIXTURES, "slow")):
            if used & fixtures and marker not in marks:
                wrong.append(f"{item.nodeid} uses {sorted(used & fixtures)}: mark it {marker}")
    if wrong:
        raise pytest.UsageError("markers that do not say what a test needs:\n" + "\n".join(wrong))


#: Non-loopback connection attempts seen by the audit hook (each was refused).
OFF_MACHINE: list[str] = []


def _loopback_only(event: str, args: tuple[object, ...]) -> None:
    if event != "socket.connect":
        return
    address = args[1]
    if not isinstance(address, tuple) or not address:
        return  # Unix sockets
    host = str(address[0])
    try:
        if ipaddress.ip_address(host.split("%", 1)[0]).is_loopback:
            return
    except ValueError:
        pass
    OFF_MACHINE.append(host)
    raise ConnectionRefusedError(f"tests may only connect to loopback, not {host}")


sys.addaudithook(_loopback_only)


@pytest.fixture(autouse=True)
def _no_off_machine_traffic() -> Iterator[None]:
    before = len(OFF_MACHINE)
    yield
    assert OFF_MACHINE[before:] == [], "a test tried to connect outside loopback"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 HTTP endpoint on loopback; AWS_* variables point at it for the session."""
    for key in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        os.environ.pop(key, None)
    with local_s3() as endpoint:
        yield endpoint


@pytest.fixture
def store(s3_endpoint: str) -> ObjectStore:
    return ObjectStore()


@pytest.fixture
def store_uri(store: ObjectStore) -> str:
    """A fresh bucket per test, so tests never see each other's objects."""
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    store.ensure_bucket(bucket)
    return f"s3://{bucket}/pipeline"


@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    with ImageServer() as server:
        yield server


@pytest.fixture
def real_csv() -> Path:
    if not REAL_CSV.is_file():
        pytest.skip(f"the CrowdFlower CSV is not at {REAL_CSV} (it ships in ../shared/data)")
    return REAL_CSV


@pytest.fixture(scope="session")
def mlflow_server(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server``: SQLite registry, artifacts proxied to the local S3 endpoint."""
    from devkit.servers import free_port, start_mlflow

    ObjectStore().ensure_bucket("mlflow")
    folder = tmp_path_factory.mktemp("mlflow")
    with start_mlflow(folder, free_port(), s3_endpoint, "s3://mlflow/artifacts") as url:
        os.environ["MLFLOW_TRACKING_URI"] = url
        yield url


# ------------------------------------------ a small labelled split and a model trained on it


@pytest.fixture(scope="session")
def learn_split(
    s3_endpoint: str, image_server: ImageServer, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """100 small labelled images (colour tint per class), downloaded and split 60/20/20; 4 of
    the held-out images carry a wrong label (:data:`FLIPPED`), as annotators' mistakes."""
    return labelled_split(
        image_server, dict.fromkeys(LABELS, 20), "learn", tmp_path_factory, flip=4
    )


#: The images whose label a split's fixture made wrong on purpose, by split URI.
FLIPPED: dict[str, list[str]] = {}


def labelled_split(
    image_server: ImageServer,
    per_label: dict[str, int],
    prefix: str,
    tmp_path_factory: pytest.TempPathFactory,
    flip: int = 0,
) -> str:
    """A bucket of its own with ``per_label`` images per class, downloaded and split 60/20/20."""
    from ml.download import DownloadConfig, download
    from ml.ingest import ingest
    from ml.splits import make_splits

    store = ObjectStore()
    bucket = f"learn-{uuid.uuid4().hex[:8]}"
    store.ensure_bucket(bucket)
    rows = labelled_urls(image_server, per_label, prefix=prefix, w=96, h=80)
    # the annotators' agreement, as the CrowdFlower export gives it (3 judgments: 1/3, 2/3, 1)
    agreement = ("1.0", "0.6667", "0.3333")
    path = tmp_path_factory.mktemp(prefix) / f"{prefix}.csv"
    path.write_bytes(
        plain_csv(
            [(url, label, agreement[i % 3]) for i, (url, label) in enumerate(rows)],
            header=("url", "label", "confidence"),
        )
    )
    dataset = ingest(str(path), f"s3://{bucket}/p", store=store).dataset
    download(dataset, DownloadConfig(allow_networks=("127.0.0.0/8",)), store=store)
    split = str(make_splits(dataset, ratios="0.6,0.2,0.2", seed=0, store=store)["split"])
    if flip:  # a wrong label on some held-out images, two classes away from the right one
        uri = S3Uri.parse(split)
        table = store.read_parquet(uri)
        held_out = table.index[table["split"] != "train"]
        chosen = table.loc[held_out].sort_values("sha256").index[:flip]
        table.loc[chosen, "label_index"] = (table.loc[chosen, "label_index"] + 2) % len(LABELS)
        table.loc[chosen, "label"] = [LABELS[i] for i in table.loc[chosen, "label_index"]]
        store.write_parquet(uri, table)
        FLIPPED[split] = table.loc[chosen, "sha256"].tolist()
    return split


@pytest.fixture(scope="session")
def trained(
    learn_split: str, mlflow_server: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    from ml.train import fine_tune

    config = small_config(learn_split, tmp_path_factory.mktemp("cache"))
    return {"config": config, "result": fine_tune(config)}
