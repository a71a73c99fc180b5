"""The audit trail against the real local stack (S3 endpoint, MLflow server): alias history and
rollback, lineage both ways, and forgetting an image on request, through to a retraining that
no longer contains it.

One small dataset in a bucket of its own (forgetting deletes images: the shared learning split
must not lose any), two one-step trainings, registered as versions 1 and 2.
"""

from __future__ import annotations

import io
import json
import threading
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from ml import audit
from ml.cli import main
from ml.download import DownloadConfig, collect_manifest, download
from ml.ingest import ingest
from ml.labels import LABELS
from ml.layout import DatasetLayout, SplitLayout, StoreLayout
from ml.lineage import image_lineage, version_lineage
from ml.predict import predict
from ml.registry import champion_training, register_model
from ml.splits import make_splits
from ml.storage import ObjectStore, S3Uri
from ml.train import fine_tune
from tests.helpers import ImageServer, labelled_urls, plain_csv, small_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LOOPBACK = DownloadConfig(allow_networks=("127.0.0.0/8",))
TARGET = "audit/Negative/0.jpg"


def _pipeline(csv: Path, root: str, store: ObjectStore) -> dict[str, Any]:
    dataset = ingest(str(csv), root, store=store)
    download(dataset.dataset, LOOPBACK, store=store)
    split = make_splits(dataset.dataset, ratios="0.6,0.2,0.2", seed=0, store=store)["split"]
    return {"dataset": dataset, "split": str(split)}


@pytest.fixture(scope="module")
def audited(
    image_server: ImageServer, mlflow_server: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    store = ObjectStore()
    bucket = f"audit-{uuid.uuid4().hex[:8]}"
    store.ensure_bucket(bucket)
    root = f"s3://{bucket}/p"
    rows = labelled_urls(image_server, dict.fromkeys(LABELS, 5), prefix="audit", w=96, h=80)
    target = image_server.url(TARGET, label="Negative", w=96, h=80)
    near = image_server.url(
        "copies/n0.jpg", content=f"/{TARGET}", label="Negative", w=96, h=80, scale=0.9
    )
    folder = tmp_path_factory.mktemp("audit")
    csv = folder / "audit.csv"
    csv.write_bytes(plain_csv([*rows, (near, "Negative")]))
    first = _pipeline(csv, root, store)
    name = f"audited-{uuid.uuid4().hex[:6]}"
    runs, registered = [], []
    for n, seed in enumerate((3, 4), start=1):
        config = small_config(
            first["split"], folder / f"cache{seed}", epochs=1, max_steps_per_epoch=1, seed=seed
        )
        runs.append(fine_tune(config)["run_id"])
        registered.append(register_model(runs[-1], name=name, orchestrator_run_id=f"manual__{n}"))
    return {
        "store": store,
        "root": root,
        "name": name,
        "csv": csv,
        "folder": folder,
        "target": target,
        "near": near,
        "runs": runs,
        "registered": registered,
        **first,
    }


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def _moves(audited: dict[str, Any]) -> list[dict[str, Any]]:
    return audit.history(audited["store"], audited["root"], audited["name"])["moves"]


def test_every_alias_move_is_recorded_and_shown_in_mlflow(audited: dict[str, Any]) -> None:
    """Registration records each move before making it: when, from which version to which, by
    which Airflow run, and the comparison that decided it."""
    name, client = audited["name"], _client()
    moves = _moves(audited)[:4]
    second = audited["registered"][1]
    expected = [("challenger", None, 1), ("champion", None, 1), ("challenger", 1, 2)]
    assert [(m["alias"], m["from_version"], m["to_version"]) for m in moves[:3]] == expected
    assert all(m["action"] == "register" for m in moves)
    assert moves[0]["by"] == "airflow run manual__1" and moves[2]["by"] == "airflow run manual__2"
    assert "first version" in moves[1]["reason"]
    if second["promoted"]:  # the paired comparison decided it, and is kept with the move
        assert (moves[3]["alias"], moves[3]["from_version"], moves[3]["to_version"]) == (
            "champion",
            1,
            2,
        )
        kept = moves[3]["decision"]["comparison"]
        assert kept == second["promotion"]["comparison"] and kept["images"] > 0
    champion = client.get_model_version_by_alias(name, "champion")
    tags = champion.tags
    assert tags["audit.champion.ledger_entry"] in {"2", "4"}
    assert tags["audit.champion.by"].startswith("airflow run manual__")
    description = client.get_registered_model(name).description
    assert audit.HISTORY_HEADING in description and "Load the current best" in description
    # the ledger is in the store: losing the MLflow database loses none of it
    keys = audited["store"].list_keys(StoreLayout.parse(audited["root"]).alias_ledger(name))
    assert len(keys) == len(_moves(audited)) >= 3


def test_rollback_is_recorded_and_the_next_run_compares_against_it(
    audited: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    name, root, client = audited["name"], audited["root"], _client()
    before = int(client.get_model_version_by_alias(name, "champion").version)
    other = 1 if before == 2 else 2
    code = main(
        [
            *("rollback", "--to", str(other), "--reason", "v2 mislabels memes"),
            *("--model-name", name, "--store", root),
        ]
    )
    assert code == 0, capsys.readouterr().err
    done = json.loads(capsys.readouterr().out)
    assert done["champion_version"] == other
    assert int(client.get_model_version_by_alias(name, "champion").version) == other
    last = _moves(audited)[-1]
    assert (last["action"], last["from_version"], last["to_version"]) == ("rollback", before, other)
    assert last["reason"] == "v2 mislabels memes" and last["by"].startswith("command line, ")
    assert champion_training(name)["version"] == other  # what the next DAG run compares with

    assert main(["history", "--model-name", name, "--store", root, "--at", last["time"]]) == 0
    table = capsys.readouterr().out
    assert f"champion at {last['time']}: v{other}" in table and "v2 mislabels memes" in table
    assert main(["history", "--model-name", name, "--store", root, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["moves"][-1] == last


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["rollback", "--to", "99", "--reason", "x"], "has no version 99 (its versions: v1, v2)"),
        (["rollback", "--to", "1", "--reason", "   "], "--reason must say why"),
        (["lineage", "--version", "42"], "has no version 42"),
        (["lineage", "--image", "0" * 64], "no dataset under"),
        (["forget", "not-a-url", "--reason", "x"], "by its http(s) URL"),
        (["forget", "0" * 64, "--reason", ""], "--reason must say why"),
        (["history", "--at", "yesterday"], "--at must be a date"),
    ],
)
def test_bad_audit_input_gets_one_clear_error(
    audited: dict[str, Any], capsys: pytest.CaptureFixture[str], argv: list[str], words: str
) -> None:
    count = len(_moves(audited))
    code = main([*argv, "--model-name", audited["name"], "--store", audited["root"]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err
    assert words in err
    assert len(_moves(audited)) == count  # nothing recorded


def test_concurrent_moves_lose_no_record(audited: dict[str, Any]) -> None:
    """Eight threads move the champion at once: every move keeps its entry, the numbers have
    no gap, and the alias ends where the last recorded move put it."""
    name, client = audited["name"], _client()
    ledger = audit.alias_ledger(audited["store"], audited["root"], name)
    before = len(ledger.entries())
    recorded: list[dict[str, Any] | None] = []
    errors: list[BaseException] = []

    def move(target: int) -> None:
        try:
            recorded.append(
                audit.move_alias(
                    _client(),
                    audit.alias_ledger(audited["store"], audited["root"], name),
                    name,
                    "champion",
                    target,
                    action="rollback",
                    reason=f"race to v{target}",
                )
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=move, args=(1 + i % 2,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    entries = ledger.entries()
    made = [e for e in recorded if e is not None]
    assert made and len(entries) == before + len(made)
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    assert sorted(e["seq"] for e in made) == [e["seq"] for e in entries[before:]]
    last = [e for e in entries if e["alias"] == "champion"][-1]
    assert int(client.get_model_version_by_alias(name, "champion").version) == last["to_version"]
    found = audit.history(audited["store"], audited["root"], name, client=client)
    assert found["disagreements"] == {}


def test_an_interrupted_move_is_finished_by_the_next(audited: dict[str, Any]) -> None:
    """A move recorded but killed before it set the alias: history says they disagree, and the
    next move (here a reconcile, as registration and rollback do first) sets it right."""
    name, client = audited["name"], _client()
    ledger = audit.alias_ledger(audited["store"], audited["root"], name)
    now = int(client.get_model_version_by_alias(name, "champion").version)
    other = 1 if now == 2 else 2
    ledger.append(
        lambda _: {
            "time": audit.now(),
            "model": name,
            "alias": "champion",
            "from_version": now,
            "to_version": other,
            "action": "rollback",
            "by": "a process killed before it set the alias",
            "reason": "interrupted",
            "decision": None,
        }
    )
    found = audit.history(audited["store"], audited["root"], name, client=client)
    assert found["disagreements"] == {"champion": {"recorded": other, "in_mlflow": str(now)}}
    assert audit.reconcile(client, ledger, name) == [f"champion: v{now} -> v{other}"]
    assert int(client.get_model_version_by_alias(name, "champion").version) == other
    assert (
        audit.history(audited["store"], audited["root"], name, client=client)["disagreements"] == {}
    )


def test_version_lineage_names_everything_to_rebuild(
    audited: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    import hashlib

    argv = ["lineage", "--version", "2", "--model-name", audited["name"]]
    assert main([*argv, "--store", audited["root"]]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found == version_lineage(audited["name"], 2, root=audited["root"])
    store = audited["store"]
    csv_bytes = audited["csv"].read_bytes()
    assert found["dataset"]["uri"] == audited["dataset"].dataset
    assert found["dataset"]["csv_sha256"] == hashlib.sha256(csv_bytes).hexdigest()
    assert found["dataset"]["csv"].endswith("audit.csv")
    split_bytes = store.get_bytes(S3Uri.parse(audited["split"]))
    assert found["split"]["uri"] == audited["split"]
    assert found["split"]["sha256"] == hashlib.sha256(split_bytes).hexdigest()
    assert found["split"]["matches_training"] is True
    counts = found["split"]["images"]
    table = pd.read_parquet(io.BytesIO(split_bytes))
    assert counts == {
        side: {label: int(((table["split"] == side) & (table["label"] == label)).sum())
               for label in LABELS}
        for side in ("train", "valid", "test")
    }  # fmt: skip
    assert sum(sum(c.values()) for c in counts.values()) == 26
    assert found["mlflow_run"] == audited["runs"][1] and found["airflow_run"] == "manual__2"
    assert found["code_version"] and found["parameters"]["seed"] == "4"
    assert found["parameters"]["split"] == audited["split"]
    assert (
        found["rebuild"] == f"the split is unchanged: python -m ml train --split {audited['split']}"
    )


def test_predictions_carry_version_and_image_and_lineage_finds_them(
    audited: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    store, root, name = audited["store"], audited["root"], audited["name"]
    csv = audited["folder"] / "score.csv"
    csv.write_bytes(plain_csv([(audited["target"],)], header=("url",)))
    out = str(StoreLayout.parse(root).run_predictions("scoring_1"))
    summary = predict(f"models:/{name}@champion", str(csv), out, config=LOOPBACK, store=store)
    champion = int(_client().get_model_version_by_alias(name, "champion").version)
    assert summary["model_version"] == champion
    rows = store.read_parquet(S3Uri.parse(out))
    manifest = store.read_parquet(DatasetLayout.parse(audited["dataset"].dataset).download_manifest)
    sha = manifest.loc[manifest["url"] == audited["target"], "sha256"].item()
    assert rows.loc[0, "sha256"] == sha and rows.loc[0, "model_version"] == champion

    for given in (audited["target"], sha):
        assert main(["lineage", "--image", given, "--model-name", name, "--store", root]) == 0
        found = json.loads(capsys.readouterr().out)
        assert found["sha256"] == [sha]
        assert [d["dataset"] for d in found["datasets"]] == [audited["dataset"].dataset]
        sides = {s["side"] for s in found["splits"]}
        assert len(sides) == 1
        assert [v["version"] for v in found["model_versions"]] == [1, 2]
        assert all(v["sides"] == sorted(sides) for v in found["model_versions"])
        assert found["predictions"] == [
            {
                "predictions": out,
                "model_version": champion,
                "label": rows.loc[0, "label"],
                "confidence": pytest.approx(float(rows.loc[0, "confidence"])),
            }
        ]


def test_forget_deletes_every_copy_and_a_retraining_leaves_it_out(
    audited: dict[str, Any], image_server: ImageServer, capsys: pytest.CaptureFixture[str]
) -> None:
    store, root, name = audited["store"], audited["root"], audited["name"]
    layout = StoreLayout.parse(root)
    old = DatasetLayout.parse(audited["dataset"].dataset)
    manifest = store.read_parquet(old.download_manifest)
    target_sha = manifest.loc[manifest["url"] == audited["target"], "sha256"].item()
    near_sha = manifest.loc[manifest["url"] == audited["near"], "sha256"].item()
    assert target_sha != near_sha
    assert store.exists(layout.image(target_sha)) and store.exists(layout.image(near_sha))

    reason = "the owner asked via https://mail.example.com/t?token=s3cr3t"
    argv = ["forget", audited["target"], "--reason", reason, "--retrain"]
    assert main([*argv, "--model-name", name, "--store", root]) == 0
    done = json.loads(capsys.readouterr().out)
    assert "trigger the image_sentiment DAG" in done["retrain"]
    assert set(done["sha256s"]) == {target_sha, near_sha}  # the split's group: the near copy too
    assert not store.exists(layout.image(target_sha)) and not store.exists(layout.image(near_sha))
    assert [v["version"] for v in done["model_versions"]] == [1, 2]
    for version in ("1", "2"):
        tags = _client().get_model_version(name, version).tags
        assert tags["audit.contains_forgotten"] == "true"
        assert tags["audit.forget_requests"] == str(done["request"])
    entry = audit.Ledger(store, layout.forget_ledger).entries()[-1]
    assert entry["reason"] == "the owner asked via https://mail.example.com/t?token=***"
    assert entry["sha256s"] == sorted(done["sha256s"])
    assert set(entry) <= {
        "seq", "time", "by", "reason", "request", "urls", "sha256s", "phashes", "deleted",
        "model_versions",
    }  # fmt: skip

    # the old dataset's manifest, collected again, says so
    collect_manifest(old.uri, store=store)
    again = store.read_parquet(old.download_manifest).set_index("url")
    assert again.loc[audited["target"], "status"] == "forgotten"
    assert again.loc[audited["near"], "status"] == "forgotten"

    # a re-published copy (another URL, the same picture) is fetched, recognised, not stored
    moved = image_server.url("moved/photo.jpg", content=f"/{TARGET}", label="Negative", w=96, h=80)
    csv = audited["folder"] / "retrain.csv"
    csv.write_bytes(audited["csv"].read_bytes() + f"{moved},Negative\n".encode())
    second = _pipeline(csv, root, store)
    assert second["dataset"].filtered == {"forgotten": 2}  # the two forgotten URLs
    rows = store.read_parquet(
        DatasetLayout.parse(second["dataset"].dataset).download_manifest
    ).set_index("url")
    assert rows.loc[moved, "status"] == "forgotten"
    assert "forgotten on request" in rows.loc[moved, "error"]
    assert not store.exists(layout.image(target_sha))

    split = store.read_parquet(SplitLayout.parse(second["split"]).manifest)
    assert not set(split["sha256"]) & {target_sha, near_sha}
    assert len(split) == 24  # 26 less the target and its near copy; the re-published one is out
    assert {audited["target"], audited["near"], moved}.isdisjoint(set(split["url"]))

    # the retraining: a version that no longer contains it
    config = small_config(
        second["split"], audited["folder"] / "cache5", epochs=1, max_steps_per_epoch=1, seed=5
    )
    third = register_model(fine_tune(config)["run_id"], name=name)
    found = image_lineage(target_sha, root=root, name=name)
    assert third["version"] == 3
    assert [v["version"] for v in found["model_versions"]] == [1, 2]


def test_history_is_read_from_the_store_while_mlflow_is_down(
    audited: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from devkit.servers import free_port

    count = len(_moves(audited))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    argv = ["history", "--model-name", audited["name"], "--store", audited["root"]]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"{count} recorded alias moves" in out
    assert "warning: MLflow's aliases not compared with the record" in out
    assert out.count("| register |") >= 3
