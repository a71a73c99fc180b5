"""Command line: ``python -m ml <stage> ...``; each stage prints one JSON summary line on stdout.

Logs and the progress bar go to stderr. A problem the user can fix prints one ``error:`` line and
exits 2; an interrupted run exits 130 after saving what it had done. Run parameters take their
names, types, ranges, defaults and help from :mod:`ml.params`, as the Airflow form does.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from ml.errors import PipelineError
from ml.params import DOWNLOAD, add_options

log = logging.getLogger("ml")

#: A stage returns its JSON summary, or text to print as it is (``history``'s table).
Runner = Callable[[argparse.Namespace], dict[str, Any] | str]
Stages = Any  # argparse's _SubParsersAction


def positive_int(text: str) -> int:
    """An argparse type for whole numbers of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# ------------------------------------------------------------------------------ stages


def _run_ingest(args: argparse.Namespace) -> dict[str, Any]:
    from ml.csvsource import SourceLimits
    from ml.ingest import ingest

    if not args.store:
        raise PipelineError("give --store s3://BUCKET/PREFIX (or set ML_STORE)")
    limits = SourceLimits(
        max_bytes=args.max_csv_bytes or SourceLimits().max_bytes,
        csv_deadline=args.csv_deadline,
        allow_networks=tuple(args.allow_network),
    )
    return ingest(
        args.csv,
        args.store,
        min_confidence=args.min_confidence or None,
        sample=args.sample or None,
        seed=args.seed,
        exclude_golden=args.exclude_golden,
        encoding=args.encoding,
        limits=limits,
    ).to_json()


def _ingest_parser(stages: Stages) -> None:
    from ml.csvsource import SourceLimits

    p = stages.add_parser(
        "ingest",
        help="validate a CSV of image URLs and labels",
        description="Validate a CSV (local path, http(s) URL or s3:// URI) and write its "
        "canonical records to the store.",
    )
    p.add_argument("csv", help="the CSV: a local path, an http(s) URL or an s3:// URI")
    p.add_argument(
        "--store",
        default=os.environ.get("ML_STORE"),
        metavar="s3://BUCKET/PREFIX",
        help="where outputs go (default: $ML_STORE)",
    )
    add_options(p, ["sample", "min_confidence", "exclude_golden", "seed"])
    p.add_argument(
        "--encoding",
        default=None,
        help="the CSV's text encoding when it is not UTF-8 and has no byte-order mark "
        "(for example cp1252); default: UTF-8, or what the BOM says",
    )
    p.add_argument(
        "--max-csv-bytes",
        type=positive_int,
        default=None,
        metavar="B",
        help="refuse a larger CSV (default: $ML_CSV_MAX_BYTES or 512 MiB)",
    )
    p.add_argument(
        "--csv-deadline",
        type=float,
        default=SourceLimits.csv_deadline,
        metavar="S",
        help="total seconds to download an http(s) CSV (default: %(default)s)",
    )
    _allow_network(p, "let an http(s) CSV come from a network the address policy refuses")
    p.set_defaults(run=_run_ingest)


def download_config(args: argparse.Namespace) -> Any:
    """The DownloadConfig that the download options describe."""
    from ml.download import DownloadConfig

    return DownloadConfig.from_values(vars(args), tuple(args.allow_network))


def check_download_options(args: argparse.Namespace) -> None:
    """Refuse wrong download options with their one clear message, even when a rerun turns
    out to have nothing to fetch (the same checks the download itself makes)."""
    from ml.netpolicy import parse_networks
    from ml.params import check_all

    check_all(vars(args), DOWNLOAD)
    parse_networks(args.allow_network)


def _run_download(args: argparse.Namespace) -> dict[str, Any]:
    from ml.heap import return_large_buffers_to_the_os

    return_large_buffers_to_the_os()  # before anything allocates (see ml.heap)
    from ml.download_state import already_done
    from ml.layout import DatasetLayout
    from ml.storage import ObjectStore

    check_download_options(args)
    store = ObjectStore(max_pool_connections=args.download_concurrency + 4)
    layout = DatasetLayout.parse(args.dataset)
    store.check_bucket(layout.store)
    # A rerun with nothing to do answers from a few requests, before pyarrow is even loaded.
    if (summary := already_done(store, layout)) is not None:
        return summary
    from ml.download import download
    from ml.progress import Progress

    config = download_config(args)
    with Progress(0, "download") as bar:  # the total comes from download's own read
        return download(
            args.dataset, config, store=store, on_total=bar.set_total, on_result=bar.advance
        )


def _allow_network(parser: Any, text: str) -> None:
    parser.add_argument(
        "--allow-network",
        action="append",
        default=[],
        metavar="CIDR",
        help=f"{text}, e.g. 127.0.0.0/8 for a local server; repeatable (default: public "
        "addresses only)",
    )


def _download_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("download limits")
    add_options(group, DOWNLOAD)
    _allow_network(group, "open a network the address policy refuses")


def _download_parser(stages: Stages) -> None:
    p = stages.add_parser(
        "download",
        help="fetch every image of a dataset into the store",
        description="Fetch, verify and store every image of a dataset; a rerun fetches only "
        "what is missing.",
    )
    p.add_argument("--dataset", required=True, metavar="URI", help="the URI ingest printed")
    _download_options(p)
    p.set_defaults(run=_run_download)


def _run_split(args: argparse.Namespace) -> dict[str, Any]:
    from ml.splits import make_splits

    return make_splits(args.dataset, ratios=args.ratios, seed=args.seed)


def _split_parser(stages: Stages) -> None:
    p = stages.add_parser(
        "split",
        help="stratified train/valid/test split of the images",
        description="Stratified, deterministic, leak-free split over images that downloaded ok.",
    )
    p.add_argument("--dataset", required=True, metavar="URI", help="the URI ingest printed")
    add_options(p, ["ratios", "seed"])
    p.set_defaults(run=_run_split)


def _run_train(args: argparse.Namespace) -> dict[str, Any]:
    from ml.params import fields_of
    from ml.train import fine_tune
    from ml.train_config import TrainConfig

    config = TrainConfig(**{name: getattr(args, name) for name in fields_of(TrainConfig)})
    return fine_tune(config)


def _train_parser(stages: Stages) -> None:
    from ml.params import fields_of
    from ml.train_config import TrainConfig

    p = stages.add_parser(
        "train",
        help="fine-tune ResNet-152 on a split, log to MLflow",
        description="Fine-tune a ResNet (ImageNet weights, new 5-way head) on the split; "
        "checkpoints every epoch and resumes after a kill. Under torchrun it uses DDP. "
        "MLflow: MLFLOW_TRACKING_URI.",
    )
    add_options(p, fields_of(TrainConfig))
    p.set_defaults(run=_run_train)


def _run_register(args: argparse.Namespace) -> dict[str, Any]:
    from ml.registry import register_model

    return register_model(
        args.run_id,
        name=args.model_name,
        margin=args.promotion_margin,
        resamples=args.promotion_resamples,
        confidence=args.promotion_confidence,
        band=args.promotion_band,
        orchestrator_run_id=args.orchestrator_run_id,
    )


def _register_parser(stages: Stages) -> None:
    p = stages.add_parser(
        "register",
        help="register a training run in the MLflow registry",
        description="Create a model version for the run (once), alias it challenger, and "
        "promote it to champion only if, scored with the champion on the same test images, "
        "its macro-F1 gain exceeds the margin and a paired bootstrap's lower bound is above 0.",
    )
    p.add_argument("--run-id", required=True, help="the run_id that train printed")
    add_options(
        p,
        [
            "model_name",
            "promotion_margin",
            "promotion_resamples",
            "promotion_confidence",
            "promotion_band",
            "orchestrator_run_id",
        ],
    )
    p.set_defaults(run=_run_register)


def _run_predict(args: argparse.Namespace) -> dict[str, Any]:
    from ml.predict import predict

    return predict(
        args.model,
        args.csv,
        args.out,
        bucket=args.bucket,
        config=download_config(args),
        batch_size=args.inference_batch_size,
        drift_p_value=None if args.no_drift else args.drift_p_value,
    )


def _predict_parser(stages: Stages) -> None:
    p = stages.add_parser(
        "predict",
        help="batch inference with a registered model",
        description="Predict the sentiment of images listed in a CSV (column url: http(s) or "
        "s3:// URIs; or object_key with --bucket).",
    )
    _model_option(p)
    p.add_argument("--csv", required=True, help="local path, http(s) URL or s3:// URI")
    p.add_argument("--out", required=True, help="output .csv or .parquet, local or s3://")
    p.add_argument("--bucket", default=None, help="bucket for bare object keys")
    add_options(p, ["inference_batch_size"])
    _download_options(p)
    from ml.deployment import Deployment

    p.add_argument(
        "--drift-p-value",
        type=float,
        default=Deployment.from_env().drift_p_value,
        help="alarm when a drift test's p-value is below this (default: $ML_DRIFT_P_VALUE "
        "or %(default)s)",
    )
    p.add_argument(
        "--no-drift",
        action="store_true",
        help="do not compare the batch with the model's test images",
    )
    p.set_defaults(run=_run_predict)


def _run_serve(args: argparse.Namespace) -> dict[str, Any]:
    from ml.serve import serve

    return serve(args.model, args.host, args.port, args.device)


def _serve_parser(stages: Stages) -> None:
    p = stages.add_parser(
        "serve",
        help="serve a registered model over HTTP (MLflow's scoring protocol)",
        description="Serve a registered model (default: the champion) at "
        "http://HOST:PORT/invocations until Ctrl-C. MLflow: MLFLOW_TRACKING_URI (and "
        "MLFLOW_TRACKING_USERNAME/PASSWORD where it signs users in).",
    )
    _model_option(p)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    p.add_argument("--port", type=positive_int, default=5001, help="(default: %(default)s)")
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where the network runs; auto: a GPU when one is visible (default: %(default)s)",
    )
    p.set_defaults(run=_run_serve)


def _model_option(parser: argparse.ArgumentParser) -> None:
    from ml.deployment import Deployment

    parser.add_argument(
        "--model",
        default=Deployment.from_env().champion_uri,
        help="a registered model: models:/<name>@<alias> or models:/<name>/<version> "
        "(default: %(default)s)",
    )


def _run_stage_weights(args: argparse.Namespace) -> dict[str, Any]:
    from ml.model import stage_weights

    return stage_weights(args.file, args.to)


def _stage_weights_parser(stages: Stages) -> None:
    p = stages.add_parser(
        "stage-weights",
        help="upload a weights file for offline workers",
        description="Upload a downloaded weights file (hash-checked) into the store, for "
        "workers without internet; train with --weights URI.",
    )
    p.add_argument("file", help="e.g. ~/.cache/torch/hub/checkpoints/resnet152-f82ba261.pth")
    p.add_argument("--to", required=True, metavar="s3://BUCKET/PREFIX")
    p.set_defaults(run=_run_stage_weights)


def _store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        default=os.environ.get("ML_STORE"),
        metavar="s3://BUCKET/PREFIX",
        help="the store whose audit trail and datasets to use (default: $ML_STORE)",
    )


def _audit_store(args: argparse.Namespace) -> str:
    if not args.store or not str(args.store).startswith("s3://"):
        raise PipelineError("give --store s3://BUCKET/PREFIX (or set ML_STORE)")
    return str(args.store).rstrip("/")


def _run_history(args: argparse.Namespace) -> dict[str, Any] | str:
    from ml import audit, mlflow_access
    from ml.storage import ObjectStore

    root = _audit_store(args)
    try:  # the record is in the store: it is shown even while MLflow is down
        mlflow_access.check_tracking_server(timeout=5.0)
        client = mlflow_access.client()
        unchecked = ""
    except PipelineError as exc:
        client, unchecked = None, str(exc)
    found = audit.history(ObjectStore(), root, args.model_name, client=client, at=args.at)
    if unchecked:
        found["mlflow_unreachable"] = unchecked
    if args.json:
        return found
    lines = [f"{args.model_name}: {len(found['moves'])} recorded alias moves"]
    if unchecked:
        lines.append(f"warning: MLflow's aliases not compared with the record: {unchecked}")
    if not found["moves"]:
        lines.append(
            f"(none under {root}/audit: is the model name right? Registrations and rollbacks "
            "record their moves there.)"
        )
    if args.at is not None:
        held = found["held"]
        lines.append(
            f"champion at {args.at}: "
            + (
                f"v{held['to_version']}, since {held['time']} (move #{held['seq']}: "
                f"{held['action']} by {held['by']}; {held['reason']})"
                if held
                else "none recorded"
            )
        )
    for alias, both in found.get("disagreements", {}).items():
        lines.append(
            f"warning: the {alias} in MLflow is v{both['in_mlflow']} but the last recorded move "
            f"put it at v{both['recorded']} (an interrupted move, or one made outside the "
            "pipeline; the next rollback or registration sets it to the record)"
        )
    lines.append(audit.history_text(found["moves"]))
    return "\n".join(lines)


def _history_parser(stages: Stages) -> None:
    p = stages.add_parser(
        "history",
        help="every move of the model's aliases: when, which versions, by whom, why",
        description="Print the append-only record of alias moves (challenger, champion), "
        "newest first; --at DATE names the champion then.",
    )
    add_options(p, ["model_name"])
    _store_option(p)
    p.add_argument("--at", help="a date or time (UTC), e.g. 2026-03-03: who was champion then")
    p.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    p.set_defaults(run=_run_history)


def _run_rollback(args: argparse.Namespace) -> dict[str, Any]:
    from ml.audit import rollback

    return rollback(args.model_name, args.to, args.reason, root=_audit_store(args))


def _rollback_parser(stages: Stages) -> None:
    p = stages.add_parser(
        "rollback",
        help="move champion to another version, recorded with a reason",
        description="Point the champion alias at --to VERSION; the move is recorded like every "
        "other, and the next pipeline run compares its new version against it.",
    )
    add_options(p, ["model_name"])
    _store_option(p)
    p.add_argument("--to", required=True, metavar="VERSION", help="the version to serve")
    p.add_argument("--reason", required=True, help="why (kept in the audit trail)")
    p.set_defaults(run=_run_rollback)


def _run_lineage(args: argparse.Namespace) -> dict[str, Any]:
    from ml.lineage import image_lineage, version_lineage

    root = _audit_store(args)
    if (args.version is None) == (args.image is None):
        raise PipelineError("give one of --version N or --image URL_OR_SHA256")
    if args.version is not None:
        return version_lineage(args.model_name, args.version, root=root)
    return image_lineage(args.image, root=root, name=args.model_name)


def _lineage_parser(stages: Stages) -> None:
    p = stages.add_parser(
        "lineage",
        help="what a version learned from, or where an image went",
        description="--version N: the CSV, dataset, split (with hashes and counts), code, "
        "parameters and runs behind a model version. --image URL_OR_SHA256: the datasets, "
        "splits, model versions and batch-inference outputs that hold or scored an image.",
    )
    add_options(p, ["model_name"])
    _store_option(p)
    p.add_argument("--version", help="a model version number")
    p.add_argument("--image", help="an image's URL (as in the CSV) or the SHA-256 of its bytes")
    p.set_defaults(run=_run_lineage)


def _run_forget(args: argparse.Namespace) -> dict[str, Any]:
    from ml.forget import forget

    result = forget(args.image, args.reason, root=_audit_store(args), name=args.model_name)
    if not args.retrain:
        result.pop("retrain")
    return result


def _forget_parser(stages: Stages) -> None:
    p = stages.add_parser(
        "forget",
        help="delete an image (and its near-duplicates) on request, and keep it out",
        description="Delete every stored copy of the image, record the request (never the "
        "image) in the append-only ledger, tag the model versions that trained on it, and keep "
        "it out of later ingests and downloads.",
    )
    p.add_argument("image", help="the image's URL (as in the CSV) or the SHA-256 of its bytes")
    p.add_argument("--reason", required=True, help="why (kept in the audit trail)")
    p.add_argument("--retrain", action="store_true", help="print how to retrain without the image")
    add_options(p, ["model_name"])
    _store_option(p)
    p.set_defaults(run=_run_forget)


STAGES = (
    _ingest_parser,
    _download_parser,
    _split_parser,
    _train_parser,
    _register_parser,
    _predict_parser,
    _serve_parser,
    _stage_weights_parser,
    _history_parser,
    _rollback_parser,
    _lineage_parser,
    _forget_parser,
)


def build_parser(
    prog: str = "python -m ml",
    description: str = "Image Sentiment Pipeline stages. Each prints one JSON summary line. "
    "The S3 endpoint and credentials come from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY.",
    stages: Sequence[Callable[[Stages], None]] = STAGES,
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    subparsers = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for add in stages:
        add(subparsers)
    return parser


# ------------------------------------------------------------------------------ running


def _one_line(text: str) -> str:
    """Messages print on one line, with URL credentials redacted."""
    from ml.redact import redact_text

    return " ".join(redact_text(text).split())[:2000]


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _configure_logging(quiet: bool) -> None:
    from ml.redact import RedactingFilter

    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:  # third-party records get redacted too
        handler.addFilter(RedactingFilter())


def run(args: argparse.Namespace) -> int:
    """Run the chosen stage: one JSON line on success, one ``error:`` line on failure."""
    _configure_logging(args.quiet)
    # SIGTERM (Airflow, kill) unwinds like Ctrl-C, so finished work is saved on the way out.
    signal.signal(signal.SIGTERM, _terminate)
    runner: Runner = args.run
    try:
        from ml import fencing

        fencing.install_from_environment()  # a rank of a fenced attempt checks its lease too
        summary = runner(args)
    except PipelineError as exc:
        print(f"error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; finished work was saved, rerun to continue", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an environment we did not foresee: still one line
        if os.environ.get("ML_DEBUG"):
            raise
        detail = _one_line(f"{type(exc).__name__}: {exc}")
        print(
            f"error: unexpected failure ({detail}); check the arguments and the environment, "
            "or rerun with ML_DEBUG=1 for the traceback and report it",
            file=sys.stderr,
        )
        return 2
    if isinstance(summary, str):
        print(summary, flush=True)
    elif summary or os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        print(json.dumps(summary, default=str, sort_keys=False), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))
