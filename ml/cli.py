"""Command line: ``python -m ml <stage> ...``; each stage prints one JSON summary line on stdout.

Logs and the progress bar go to stderr. A problem the user can fix prints one ``error:`` line and
exits 2; an interrupted run exits 130 after saving what it had done.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from ml.errors import PipelineError

log = logging.getLogger("ml")


def _bounded(
    kind: type[Any], low: float, *, high: float | None = None, strict: bool = False
) -> Callable[[str], Any]:
    """An argparse type: ``kind`` parsed from text, at least ``low`` (above it when strict)."""
    noun = "whole number" if kind is int else "number"
    if high is not None:
        rule = f"must be between {low:g} and {high:g}"
    else:
        rule = f"must be greater than {low:g}" if strict else f"must be at least {low:g}"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {noun}") from None
        if value < low or (strict and value == low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{rule}, got {value}")
        return value

    return parse


_positive_int = _bounded(int, 1)
_non_negative_int = _bounded(int, 0)
_positive_float = _bounded(float, 0, strict=True)
_fraction = _bounded(float, 0, high=1)
_port = _bounded(int, 0, high=65535)


def _store_default() -> str | None:
    return os.environ.get("ML_STORE")


def _run_ingest(args: argparse.Namespace) -> dict[str, Any]:
    from ml.ingest import ingest

    if not args.store:
        raise PipelineError("give --store s3://BUCKET/PREFIX (or set ML_STORE)")
    from ml.csvsource import SourceLimits

    limits = SourceLimits(
        max_bytes=args.max_csv_bytes or SourceLimits().max_bytes,
        deadline=args.csv_deadline,
        allow_networks=tuple(args.allow_network),
    )
    return ingest(
        args.csv,
        args.store,
        min_confidence=args.min_confidence,
        sample=args.sample,
        seed=args.seed,
        exclude_golden=args.exclude_golden,
        encoding=args.encoding,
        limits=limits,
    ).to_json()


def download_config(args: argparse.Namespace) -> Any:
    """The DownloadConfig that the download options describe."""
    from ml.download import DownloadConfig
    from ml.fetch import FetchConfig
    from ml.imaging import ImageConfig

    fetch = FetchConfig(
        connect_timeout=args.connect_timeout,
        read_timeout=args.read_timeout,
        deadline=args.deadline,
        retries=args.retries,
        max_bytes=args.max_bytes,
        per_host=args.per_host or args.concurrency,
    )
    image = ImageConfig(max_side=args.max_side, max_pixels=args.max_pixels)
    return DownloadConfig(
        concurrency=args.concurrency,
        allow_networks=tuple(args.allow_network),
        fetch=fetch,
        image=image,
        flush_rows=args.flush_rows,
    )


def _run_download(args: argparse.Namespace) -> dict[str, Any]:
    from ml.download import download, read_records
    from ml.layout import DatasetLayout
    from ml.progress import Progress
    from ml.storage import ObjectStore

    config = download_config(args)
    store = ObjectStore(max_pool_connections=config.concurrency + 4)
    layout = DatasetLayout.parse(args.dataset)
    store.check_bucket(layout.store)
    total = len(read_records(layout, store))
    with Progress(total, "download") as bar:
        return download(args.dataset, config, store=store, on_result=bar.advance)


def _run_split(args: argparse.Namespace) -> dict[str, Any]:
    from ml.splits import make_splits

    return make_splits(args.dataset, ratios=args.ratios, seed=args.seed)


TRAIN_HELP = {
    "split": "the split manifest URI that the split stage printed (required)",
    "arch": "torchvision ResNet depth (default: %(default)s)",
    "weights": "IMAGENET1K_V2, IMAGENET1K_V1, a .pth file, an s3:// URI, or none (tests and "
    "demos only) (default: %(default)s)",
    "weights_sha256": "expected SHA-256 (prefix) of the weights file",
    "download_weights": "let torchvision download named weights (needs internet)",
    "batch_size": "images per step and process (default: %(default)s)",
    "optimizer": "sgd or adamw (default: %(default)s)",
    "warmup_epochs": "linear warmup before the cosine decay (default: %(default)s)",
    "imbalance": "class_weights, sampler or none (default: %(default)s)",
    "head_epochs": "first epochs train the new head only (default: %(default)s)",
    "device": "auto, cpu, cuda or cuda:N (default: %(default)s)",
    "precision": "bf16, fp16 (with a grad scaler) or fp32; CUDA only (default: %(default)s)",
    "channels_last": "channels_last memory format (default: on)",
    "compile": "torch.compile the model",
    "clip_grad": "gradient norm clip, 0 to disable (default: %(default)s)",
    "patience": "early stop after this many epochs without a better validation macro-F1, "
    "0 to disable (default: %(default)s)",
    "workers": "DataLoader worker processes (default: %(default)s)",
    "max_steps_per_epoch": "cap steps per epoch, 0 for all (tests, demos)",
    "experiment": "MLflow experiment (default: %(default)s)",
    "checkpoint": "s3:// folder for checkpoints (default: derived from the split and config)",
    "cache_dir": "local image cache (default: ~/.cache/image-sentiment/images)",
    "orchestrator_run_id": "the orchestrator's run id, tagged on the run",
}


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    import dataclasses

    from ml.train_config import TrainConfig

    defaults = TrainConfig()
    for item in dataclasses.fields(TrainConfig):
        flag = "--" + item.name.replace("_", "-")
        default = getattr(defaults, item.name)
        text = TRAIN_HELP.get(item.name, "(default: %(default)s)")
        if isinstance(default, bool):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=text
            )
        else:
            parser.add_argument(
                flag, type=type(default), default=default, help=text, metavar=item.name.upper()
            )


def _run_train(args: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    from ml.train import fine_tune
    from ml.train_config import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    return fine_tune(config)


def _run_register(args: argparse.Namespace) -> dict[str, Any]:
    from ml.registry import register_model

    return register_model(
        args.run_id,
        name=args.name,
        margin=args.margin,
        orchestrator_run_id=args.orchestrator_run_id,
    )


def _run_predict(args: argparse.Namespace) -> dict[str, Any]:
    from ml.predict import predict

    return predict(
        args.model,
        args.csv,
        args.out,
        bucket=args.bucket,
        config=download_config(args),
        batch_size=args.batch_size,
    )


def _run_stage_weights(args: argparse.Namespace) -> dict[str, Any]:
    from ml.model import stage_weights

    return stage_weights(args.file, args.to)


def _run_imageserver(args: argparse.Namespace) -> dict[str, Any]:
    from ml.imageserver import ImageServer, realistic_pool

    pool = realistic_pool(args.pool) if args.pool else None
    try:
        server = ImageServer(args.host, args.port, latency=args.latency_ms / 1000, pool=pool)
    except (OSError, OverflowError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise PipelineError(
            f"cannot listen on {args.host}:{args.port}: {reason}; choose a free port "
            "(--port 0 picks one) or another --host"
        ) from None
    server.start()
    print(json.dumps({"imageserver": server.base_url}), flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        server.stop()


def _run_demo(args: argparse.Namespace) -> dict[str, Any]:
    from ml.demo import run_demo

    return run_demo(sample=args.sample, csv=args.csv, seed=args.seed)


def _add_download_options(parser: argparse.ArgumentParser) -> None:
    from ml.download import default_concurrency

    group = parser.add_argument_group("download limits")
    group.add_argument(
        "--concurrency",
        type=_positive_int,
        default=default_concurrency(),
        help="parallel downloads (default: %(default)s on this machine)",
    )
    group.add_argument(
        "--per-host",
        type=_positive_int,
        default=16,
        help="open connections per host at most (default: %(default)s)",
    )
    group.add_argument(
        "--allow-network",
        action="append",
        default=[],
        metavar="CIDR",
        help="open a network the address policy refuses, e.g. 127.0.0.0/8 for a "
        "local server; repeatable (default: public addresses only)",
    )
    group.add_argument("--connect-timeout", type=_positive_float, default=5.0, metavar="S")
    group.add_argument("--read-timeout", type=_positive_float, default=10.0, metavar="S")
    group.add_argument(
        "--deadline",
        type=_positive_float,
        default=30.0,
        metavar="S",
        help="total seconds per image, retries included (default: %(default)s)",
    )
    group.add_argument(
        "--retries",
        type=_non_negative_int,
        default=2,
        help="extra attempts on timeouts, 429 and 5xx (default: %(default)s)",
    )
    group.add_argument(
        "--max-bytes",
        type=_positive_int,
        default=10 * 1024 * 1024,
        help="byte cap per image, enforced while reading (default: 10 MiB)",
    )
    group.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=40_000_000,
        help="refuse images whose header declares more pixels (default: 40M)",
    )
    group.add_argument(
        "--max-side",
        type=_non_negative_int,
        default=256,
        help="shorter side of stored images at most; 0 keeps size (default: 256)",
    )
    group.add_argument(
        "--flush-rows",
        type=_positive_int,
        default=200,
        help="write a manifest part after this many results; a kill loses at most this many "
        "rows (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ml",
        description="Image Sentiment Pipeline stages. Each prints one JSON summary line. "
        "The S3 endpoint and credentials come from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    p = stages.add_parser(
        "ingest",
        help="validate a CSV of image URLs and labels",
        description="Validate a CSV (local path, http(s) URL or s3:// URI) "
        "and write its canonical records to the store.",
    )
    p.add_argument("csv", help="the CSV: a local path, an http(s) URL or an s3:// URI")
    p.add_argument(
        "--store",
        default=_store_default(),
        metavar="s3://BUCKET/PREFIX",
        help="where outputs go (default: $ML_STORE)",
    )
    p.add_argument(
        "--min-confidence",
        type=_fraction,
        default=None,
        metavar="F",
        help="drop rows whose label confidence is below F (0-1)",
    )
    p.add_argument(
        "--sample",
        type=_positive_int,
        default=None,
        metavar="N",
        help="keep N rows, stratified by label",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for --sample (default: 0)")
    p.add_argument(
        "--exclude-golden",
        action="store_true",
        help="drop CrowdFlower's golden (test-question) rows",
    )
    p.add_argument(
        "--encoding",
        default=None,
        help="the CSV's text encoding when it is not UTF-8 and has no byte-order mark "
        "(for example cp1252); default: UTF-8, or what the BOM says",
    )
    p.add_argument(
        "--max-csv-bytes",
        type=_positive_int,
        default=None,
        metavar="B",
        help="refuse a larger CSV (default: $ML_CSV_MAX_BYTES or 512 MiB)",
    )
    p.add_argument(
        "--csv-deadline",
        type=_positive_float,
        default=300.0,
        metavar="S",
        help="total seconds to download an http(s) CSV (default: %(default)s)",
    )
    p.add_argument(
        "--allow-network",
        action="append",
        default=[],
        metavar="CIDR",
        help="let an http(s) CSV come from a network the address policy refuses (repeatable)",
    )
    p.set_defaults(run=_run_ingest)

    p = stages.add_parser(
        "download",
        help="fetch every image of a dataset into the store",
        description="Fetch, verify and store every image of a dataset; a rerun "
        "fetches only what is missing.",
    )
    p.add_argument("--dataset", required=True, metavar="URI", help="the URI ingest printed")
    _add_download_options(p)
    p.set_defaults(run=_run_download)

    p = stages.add_parser(
        "split",
        help="stratified train/valid/test split of the images",
        description="Stratified, deterministic, leak-free split over images that downloaded ok.",
    )
    p.add_argument("--dataset", required=True, metavar="URI", help="the URI ingest printed")
    p.add_argument(
        "--ratios", default="0.8,0.15,0.05", help="train,valid,test (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.set_defaults(run=_run_split)

    p = stages.add_parser(
        "train",
        help="fine-tune ResNet-152 on a split, log to MLflow",
        description="Fine-tune a ResNet (ImageNet weights, new 5-way head) on "
        "the split; checkpoints every epoch and resumes after a kill. Under "
        "torchrun it uses DDP. MLflow: MLFLOW_TRACKING_URI.",
    )
    _add_train_options(p)
    p.set_defaults(run=_run_train)

    p = stages.add_parser(
        "register",
        help="register a training run in the MLflow registry",
        description="Create a model version for the run (once), alias it "
        "challenger, and promote it to champion if it beats the champion's "
        "test macro-F1 by --margin.",
    )
    p.add_argument("--run-id", required=True, help="the run_id that train printed")
    p.add_argument(
        "--name", default="image-sentiment", help="registered model name (default: %(default)s)"
    )
    p.add_argument(
        "--margin",
        type=float,
        default=0.0,
        help="macro-F1 a new version must gain over the champion (default: %(default)s)",
    )
    p.add_argument("--orchestrator-run-id", default="", help="tagged on the version")
    p.set_defaults(run=_run_register)

    p = stages.add_parser(
        "predict",
        help="batch inference with a registered model",
        description="Predict the sentiment of images listed in a CSV (column "
        "url: http(s) or s3:// URIs; or object_key with --bucket).",
    )
    p.add_argument(
        "--model",
        default="models:/image-sentiment@champion",
        help="any MLflow model URI (default: %(default)s)",
    )
    p.add_argument("--csv", required=True, help="local path, http(s) URL or s3:// URI")
    p.add_argument("--out", required=True, help="output .csv or .parquet, local or s3://")
    p.add_argument("--bucket", default=None, help="bucket for bare object keys")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    _add_download_options(p)
    p.set_defaults(run=_run_predict)

    p = stages.add_parser(
        "stage-weights",
        help="upload a weights file for offline workers",
        description="Upload a downloaded weights file (hash-checked) into the "
        "store, for workers without internet; train with --weights URI.",
    )
    p.add_argument("file", help="e.g. ~/.cache/torch/hub/checkpoints/resnet152-f82ba261.pth")
    p.add_argument("--to", required=True, metavar="s3://BUCKET/PREFIX")
    p.set_defaults(run=_run_stage_weights)

    p = stages.add_parser(
        "imageserver",
        help="serve synthetic images with injectable faults",
        description="Local stand-in for an image host (synthetic images).",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    p.add_argument("--port", type=_port, default=8000, help="0 picks a free port")
    p.add_argument("--latency-ms", type=float, default=0.0, help="added to every answer")
    p.add_argument(
        "--pool",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="serve N pre-made 500 px JPEGs of 30-150 KB (unique bytes per URL) "
        "instead of rendering each image (benchmarks)",
    )
    p.set_defaults(run=_run_imageserver)

    p = stages.add_parser(
        "demo",
        help="run ingest, download and split offline, end to end",
        description="Start a local S3 endpoint and image server, then run the "
        "stages on a sample of the dataset with its URLs pointed at synthetic "
        "images.",
    )
    p.add_argument("--sample", type=_positive_int, default=200, metavar="N")
    p.add_argument(
        "--csv",
        default=None,
        help="CSV to sample (default: the bundled dataset if present, else a generated one)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run_demo)
    return parser


def _one_line(text: str) -> str:
    """Messages print on one line, with URL credentials redacted."""
    from ml.redact import redact_text

    return " ".join(redact_text(text).split())[:2000]


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from ml.redact import RedactingFilter

    for handler in logging.getLogger().handlers:  # third-party records get redacted too
        handler.addFilter(RedactingFilter())
    # SIGTERM (Airflow, kill) unwinds like Ctrl-C, so finished work is saved on the way out.
    signal.signal(signal.SIGTERM, _terminate)
    run: Callable[[argparse.Namespace], dict[str, Any]] = args.run
    try:
        summary = run(args)
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
    if summary or os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        print(json.dumps(summary, default=str, sort_keys=False), flush=True)
    return 0
