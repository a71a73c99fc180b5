"""The README's main command: bring the stack up, stage a sample of the CrowdFlower CSV, run
the DAG (a quick first model, then a retrain that the registry compares with it), wait for the
batch inference the new champion triggers, and say where to look."""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.parse
from typing import Any

from devkit.stack.local import (
    DAG_ID,
    DEMO_CSV,
    INFERENCE_DAG_ID,
    SCORE_CSV,
    LocalStack,
    say,
)
from devkit.stack.report import describe_promotion

#: The embedded defaults of the demo run: small and CPU-sized, with a real DAG run end to end.
#: The staged CSV as it is (its sample is made when it is staged), and a larger test split than
#: the default so that the promotion compares on 40 images, not 10.
DEMO_CONF = {
    "csv": DEMO_CSV,
    "sample": 0,
    "ratios": "0.6,0.2,0.2",
    "epochs": 16,
    "batch_size": 16,
    "image_size": 64,
    "weights": "none",
    "device": "cpu",
    "workers": 0,
    "learning_rate": 0.03,
    "max_side": 128,
    "download_batch_size": 50,
    "patience": 0,
}


def prepare_demo_csv(
    stack: LocalStack, sample_source: str | None, real: bool = False, rows: int = 200
) -> None:
    """Stage the demo's CSV: ``rows`` rows of the source (stratified), pointed at the image
    server, with a few faulty rows and near-duplicate copies; or (``real``) the CSV as it is."""
    from devkit.demo import source_csv, stage_demo_inputs
    from ml.errors import PipelineError
    from ml.storage import ObjectStore, S3Uri

    with stack.session():
        try:
            if real:  # the CSV as it is: its images come from their real hosts
                ObjectStore().put_bytes(
                    S3Uri.parse(DEMO_CSV), source_csv(sample_source), content_type="text/csv"
                )
            else:
                images = stack.url("images")
                stage_demo_inputs(images, DEMO_CSV, SCORE_CSV, sample_source, rows=rows)
        except PipelineError as exc:
            raise SystemExit(f"error: {exc}") from None


def demo(stack: LocalStack, args: argparse.Namespace) -> int:
    stack.up(args.topology)
    epochs = 1 if args.retrain else int(args.epochs)
    conf = {**DEMO_CONF, "epochs": epochs}
    if args.real:
        say("using the CSV as it is: images are fetched from their real hosts (needs internet)")
        conf["sample"] = args.sample
    else:
        say(
            f"staging a {args.sample}-row sample of the CrowdFlower CSV pointed at the local "
            "image server (its images are SYNTHETIC: a colour per label on noise, not the real "
            "photos; a few URLs are faulty and a few pictures copied, on purpose) ..."
        )
    prepare_demo_csv(stack, args.csv, args.real, args.sample)
    arch = stack.client_environment().get("ML_ARCH", "resnet152")
    note = f"{arch}, {epochs} CPU epoch{'s' if epochs > 1 else ''}"
    first = run_and_report(stack, conf, args.timeout, f"synthetic images, {note}")
    if first is None:
        return 1
    runs = [first]
    if args.retrain:
        say(
            f"\nretraining with a better setting ({args.epochs} epochs instead of 1), as an "
            "experiment would; the registry scores the champion on the new version's test "
            "images and promotes only a gain beyond noise ..."
        )
        retrain = {**conf, "epochs": args.epochs}
        second = run_and_report(stack, retrain, args.timeout, f"{arch}, {args.epochs} CPU epochs")
        if second is None:
            return 1
        runs.append(second)
    scored = wait_inference(stack, 120)
    if scored:
        say(
            f"  inference  : {INFERENCE_DAG_ID} scored {scored.get('predicted', 0)} images with "
            f"the champion -> {scored.get('predictions')}"
        )
        drift = scored.get("drift")
        say(f"  drift      : {drift['verdict'] if drift else 'not checked'}")
    say("The stack stays up for browsing. Stop it with: bash scripts/stop")
    print(json.dumps({"runs": runs, "inference": scored}), flush=True)
    return 0


def run_and_report(
    stack: LocalStack, conf: dict[str, Any], timeout: float, note: str
) -> dict[str, Any] | None:
    """Trigger one run, wait, and print what it did; None when it did not succeed."""
    run_id = stack.trigger(conf)
    say(f"triggered {DAG_ID} run {run_id}; waiting (Ctrl-C stops waiting, not the stack) ...")
    result = stack.wait(run_id, timeout)
    quoted = urllib.parse.quote(run_id, safe="")
    run_link = f"http://localhost:{stack.ports['airflow']}/dags/{DAG_ID}/runs/{quoted}"
    if result == "timeout":
        say(
            f"\nthe run is still going after {timeout:.0f} s (the demo stopped waiting, not the "
            f"run): follow it at {run_link}, or wait longer next time with --timeout SECONDS; "
            "the stack stays up (stop it with: bash scripts/stop)"
        )
        return None
    tasks = stack.tasks(run_id)
    if result != "success":
        failed = [t["task_id"] for t in tasks if t["state"] == "failed"]
        say(
            f"\nthe run ended {result}{' in ' + ', '.join(failed) if failed else ''}; logs: "
            f"{run_link} (stack left up; stop it with: bash scripts/stop)"
        )
        return None
    manifest = stack.xcom(run_id, "collect_manifest")
    split = stack.xcom(run_id, "split")
    say("\nrun succeeded")
    say(f"  Airflow UI : {run_link}")
    say(f"  downloads  : {manifest['statuses']}")
    say(
        f"  split      : {split['groups']} groups; {split['near_duplicate_groups']} "
        f"near-duplicate groups of {split['near_duplicate_images']} images kept in one split"
    )
    summary: dict[str, Any] = {
        "dag_run_id": run_id,
        "downloads": manifest["statuses"],
        "near_duplicate_groups": split["near_duplicate_groups"],
    }
    if {t["task_id"]: t["state"] for t in tasks}.get("register") != "success":
        say(
            "  model      : nothing new to train: the data and settings equal the champion's "
            "(the trigger form's force_retrain trains anyway)"
        )
        return {**summary, "model": None}
    registered = stack.xcom(run_id, "register")
    say_registered(stack, registered, note)
    return {**summary, "model": registered}


def say_registered(stack: LocalStack, registered: dict[str, Any], note: str) -> None:
    metrics = registered.get("metrics", {})
    say(
        f"  MLflow UI  : http://localhost:{stack.ports['mlflow']}/#/models/"
        f"{registered['model']}/versions/{registered['version']}"
    )
    say(
        f"  model      : {registered['model']} version {registered['version']}, aliases "
        f"{', '.join(registered['aliases'])}"
    )
    say(
        f"  test       : accuracy {metrics.get('test_accuracy', 0):.3f}, macro-F1 "
        f"{metrics.get('test_macro_f1', 0):.3f} on its own test split ({note})"
    )
    say(f"  promotion  : {describe_promotion(registered['promotion'])}")
    bands = registered.get("agreement_bands") or {}
    if bands:
        say(
            "  agreement  : "
            + "; ".join(
                f"{band} macro-F1 {b['macro_f1']:.3f} ({b['images']} images)"
                for band, b in bands.items()
            )
        )
    issues = registered.get("label_issues")
    if issues is not None:
        say(f"  labels     : {issues['listed']} likely label errors among held-out images")
        for item in issues["top"]:
            say(
                f"               {item['url']}: given {item['given_label']}, the model says "
                f"{item['suggested_label']} ({item['confidence']:.2f})"
            )


def wait_inference(stack: LocalStack, timeout: float) -> dict[str, Any] | None:
    """The newest batch-inference run that scored, once none is waiting or running (a run
    triggered by a version that stayed challenger is skipped: nothing new to score)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = stack.airflow.runs(INFERENCE_DAG_ID)
        if runs and all(r["state"] in ("success", "failed") for r in runs):
            for run in sorted(runs, key=lambda r: str(r.get("run_after")), reverse=True):
                try:
                    result = stack.xcom(run["dag_run_id"], "predict", INFERENCE_DAG_ID)
                except urllib.error.HTTPError:  # skipped: no result
                    continue
                if result:
                    return dict(result)
            return None
        time.sleep(3)
    say(f"  inference  : {INFERENCE_DAG_ID} had not finished after {timeout:.0f}s; see the UI")
    return None
