"""Ingest memory benchmark: peak RSS of `python -m ml ingest` on a large CrowdFlower-shaped CSV.

Generates a CSV in the CrowdFlower export's shape (10 columns, bare-CR records, the long column
names, a newline inside some quoted fields), starts a moto S3 server in its own process, and
runs the ingest CLI in a child process, measuring the child's peak RSS and wall time. With
``--baseline REV`` the same file is ingested by the code at that git revision too (checked out
into a temporary worktree), side by side in one run.

Usage::

    .venv/bin/python -m benchmarks.ingest_memory --rows 1000000
    .venv/bin/python -m benchmarks.ingest_memory --rows 200000 --baseline f535724
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.download import MEASURE, free_port, wait_port

REPO = Path(__file__).resolve().parent.parent

LABELS = ("Positive", "Neutral", "Negative", "Highly positive", "Highly negative")
WEIGHTS = (0.5477, 0.2707, 0.1357, 0.0277, 0.0181)
LONG = "which_of_these_sentiment_scores_does_the_above_image_fit_into_best"
HEADER = (
    f"_unit_id,_golden,_unit_state,_trusted_judgments,_last_judgment_at,{LONG},"
    f"{LONG}:confidence,imageurl,{LONG}_gold,{LONG}_gold_reason"
)


def write_csv(path: Path, rows: int, seed: int = 0) -> None:
    """``rows`` records like the real export (about 120 bytes each), ending in a bare CR."""
    rng = random.Random(seed)
    with path.open("w", newline="") as out:
        out.write(HEADER + "\r")
        for i in range(rows):
            label = rng.choices(LABELS, WEIGHTS)[0]
            golden = i % 25 == 0
            gold = f'"{label}\nPositive"' if golden else ""
            out.write(
                f"{694550568 + i},{'TRUE' if golden else 'FALSE'},"
                f"{'golden' if golden else 'finalized'},3,3/26/15 2:{i % 60:02d},{label},"
                f"{rng.choice((0.3333, 0.6667, 1.0))},"
                f"https://farm{rng.randint(1, 9)}.staticflickr.com/{rng.randint(1000, 9999)}/"
                f"{10000000 + i}_{rng.getrandbits(40):010x}.jpg,{gold},\r"
            )


def run_ingest(csv: Path, store: str, env: dict[str, str], code: Path) -> dict[str, object]:
    command = [sys.executable, "-m", "ml", "-q", "ingest", str(csv), "--store", store]
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(command)],
        capture_output=True,
        text=True,
        check=True,
        cwd=code,
        env={**env, "PYTHONPATH": str(code)},
    )
    result: dict[str, object] = json.loads(done.stdout)
    if result["rc"] != 0:
        raise SystemExit(f"ingest failed: {result['stderr']}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--baseline", default="", help="also measure this git revision")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        csv = tmp / "big.csv"
        started = time.monotonic()
        write_csv(csv, args.rows)
        print(
            f"CSV: {args.rows:,} rows, {csv.stat().st_size / 1e6:.1f} MB "
            f"(written in {time.monotonic() - started:.1f}s)"
        )
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        env = {
            **os.environ,
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        try:
            wait_port(port)
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "from ml.storage import ObjectStore; ObjectStore().ensure_bucket('bench')",
                ],
                env=env,
                cwd=REPO,
                check=True,
            )
            codes = [("this tree", REPO)]
            if args.baseline:
                worktree = tmp / "baseline"
                subprocess.run(
                    ["git", "worktree", "add", "--detach", str(worktree), args.baseline],
                    cwd=REPO,
                    check=True,
                    capture_output=True,
                )
                codes.append((f"baseline {args.baseline}", worktree))
            print("| code | rows | peak RSS MB | bytes per row | wall s |")
            print("|---|---|---|---|---|")
            try:
                for index, (name, code) in enumerate(codes):
                    result = run_ingest(csv, f"s3://bench/run{index}", env, code)
                    rss = float(result["rss_mb"])  # type: ignore[arg-type]
                    summary = json.loads(str(result["stdout"]).strip().splitlines()[-1])
                    print(
                        f"| {name} | {summary['rows']:,} | {rss:.0f} | "
                        f"{rss * 1024 * 1024 / args.rows:.0f} | "
                        f"{float(result['wall']):.1f} |",
                        flush=True,
                    )  # type: ignore[arg-type]
            finally:
                if args.baseline:
                    subprocess.run(
                        ["git", "worktree", "remove", "--force", str(tmp / "baseline")],
                        cwd=REPO,
                        check=False,
                        capture_output=True,
                    )
        finally:
            server.terminate()
            server.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
