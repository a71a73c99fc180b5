"""``python -m devkit <command>``: the development tools, with the same conventions as
``python -m ml`` (one JSON line on success, one ``error:`` line and exit 2 on failure)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

from ml.cli import Stages, build_parser, positive_int, run
from ml.errors import PipelineError
from ml.params import PARAMETERS


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 0 and 65535, got {value}")
    return value


def _run_imageserver(args: argparse.Namespace) -> dict[str, Any]:
    from devkit.imageserver import ImageServer, realistic_pool

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


def _imageserver_parser(stages: Stages) -> None:
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
        type=int,
        default=0,
        metavar="N",
        help="serve N pre-made 500 px JPEGs of 30-150 KB (each URL its own pixels) instead of "
        "rendering each image (benchmarks)",
    )
    p.set_defaults(run=_run_imageserver)


def _run_demo(args: argparse.Namespace) -> dict[str, Any]:
    from devkit.demo import run_demo

    return run_demo(rows=args.sample, csv=args.csv, seed=args.seed)


def _demo_parser(stages: Stages) -> None:
    p = stages.add_parser(
        "demo",
        help="run ingest, download and split offline, end to end",
        description="Start a local S3 endpoint and image server, then run the stages on a "
        "sample of the dataset with its URLs pointed at synthetic images.",
    )
    p.add_argument("--sample", type=positive_int, default=200, metavar="N")
    p.add_argument(
        "--csv",
        default=None,
        help="CSV to sample (default: the bundled dataset if present, else a generated one)",
    )
    p.add_argument("--seed", type=int, default=PARAMETERS["seed"].default)
    p.set_defaults(run=_run_demo)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(
        prog="python -m devkit",
        description="Development tools: a local image server and the offline demo.",
        stages=(_imageserver_parser, _demo_parser),
    )
    return run(parser.parse_args(argv))
