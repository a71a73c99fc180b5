"""What only a GPU can show, in one prepared run with a time budget: the device's facts, a short
epoch through the trainer's own step, the served model on the GPU and on the CPU, throughput.

1. Facts: device name, compute capability, native bf16, and the precision the trainer would
   really use for its default bf16 (``ml.loop.effective_precision``: fp16 with loss scaling on
   GPUs without native bf16).
2. One short epoch of the configured network through ``ml.loop`` (the trainer's step, its
   effective precision, channels_last), eager and with ``torch.compile``: the loss must be
   finite and the weights must move.
3. The served model (``ml.serving.SentimentModel``, from the artifacts MLflow logs) exported from
   the trained weights and loaded once on the device and once on the CPU; both score the same
   JPEG and PNG files: same statuses and labels, probabilities within tolerance.
4. The throughput benchmark (``train_throughput.py``'s rows), as far as the budget allows.

The JSON report is rewritten after each step, so a run cut short still leaves what it measured.
A CPU smoke mode (``--smoke --device cpu``: ResNet-18 at 64 px, a few steps, compile with the
``eager`` backend) runs every step but CUDA itself in the test suite, so this script cannot rot.

    python -m benchmarks.gpu_check --out gpu_check.json --budget-s 450   # one H200: under 8 min
    python -m benchmarks.gpu_check --smoke --device cpu --out smoke.json  # the test suite's run
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.train_throughput import Bench, Budget, bench_gpu
from ml.loop import effective_precision, make_step, native_bf16, train_one_epoch
from ml.model import Classifier, architecture
from ml.runtime import Runtime
from ml.train_config import TrainConfig
from ml.transforms import Preprocessing

REPO = Path(__file__).resolve().parent.parent


def device_facts(device: torch.device) -> dict[str, Any]:
    facts: dict[str, Any] = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        facts.update(
            name=torch.cuda.get_device_name(device),
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
            native_bf16=native_bf16(device),
            memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1),
        )
    facts["bf16_runs_as"] = effective_precision("bf16", device)
    return facts


def train_epoch(bench: Bench, compile_model: bool) -> tuple[nn.Module, dict[str, Any]]:
    """One short epoch through the trainer's own step (``ml.loop``)."""
    cfg = TrainConfig(
        split="s3://check/x",
        arch=bench.arch,
        image_size=bench.size,
        batch_size=bench.batch,
        compile=compile_model,
        max_steps_per_epoch=bench.steps,
        workers=0,
    )
    device = torch.device(bench.device)
    rt = Runtime(0, 1, 0, device)
    torch.backends.cudnn.benchmark = True
    generator = torch.Generator().manual_seed(0)
    n = cfg.batch_size * bench.steps
    images = torch.randint(
        0, 256, (n, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, generator=generator
    )
    loader = DataLoader(
        TensorDataset(images, torch.arange(n) % 5),
        batch_size=cfg.batch_size,
        drop_last=True,
        pin_memory=device.type == "cuda",
    )
    model = architecture(cfg.arch).to(device).to(memory_format=torch.channels_last)
    before = model.fc.weight.detach().clone()
    preprocessing = Preprocessing()
    step = make_step(
        model, cfg, rt, bench.steps, preprocessing.normalizer(device, channels_last=True)
    )
    trained: nn.Module = (
        torch.compile(model, backend=bench.compile_backend)  # type: ignore[assignment]
        if compile_model
        else model
    )
    trained.train()
    started = time.perf_counter()
    stats = train_one_epoch(trained, loader, step, cfg, rt)
    stats["wall_s"] = round(time.perf_counter() - started, 2)
    stats["precision_used"] = effective_precision(cfg.precision, device)
    stats["finite"] = bool(np.isfinite(stats["train_loss"]))
    stats["weights_moved"] = not torch.equal(before, model.fc.weight.detach())
    return model, stats


def sample_files(count: int = 6) -> list[bytes]:
    """JPEG and PNG files of a few sizes, as the served model receives them."""
    from devkit.imageserver import render_image

    files = []
    for i in range(count):
        image = render_image(f"check-{i}", width=160 + 40 * i, height=120 + 30 * i)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG" if i % 2 == 0 else "PNG")
        files.append(buffer.getvalue())
    return files


def serve_both_ways(model: nn.Module, bench: Bench) -> dict[str, Any]:
    """The served model on ``bench.device`` and on the CPU, scoring the same files."""
    import pandas as pd

    from ml.labels import LABELS
    from ml.serving import IMAGE_COLUMN, SentimentModel, export

    preprocessing = Preprocessing(crop_size=bench.size, resize_size=round(bench.size * 256 / 224))
    classifier = Classifier(
        model.float().to(memory_format=torch.contiguous_format),
        preprocessing.mean,
        preprocessing.std,
    )
    frame = pd.DataFrame({IMAGE_COLUMN: sample_files()})
    answers: dict[str, Any] = {}
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as name:
        config = {"arch": bench.arch, "labels": LABELS, "preprocessing": preprocessing.to_dict()}
        artifacts = export(classifier, Path(name), config)
        for device in dict.fromkeys((bench.device, "cpu")):

            class Context:
                def __init__(self, device: str = device) -> None:
                    self.artifacts = artifacts
                    self.model_config = {"device": device}

            served = SentimentModel()
            served.load_context(Context())
            answers[device] = served.predict(None, frame)
            result[device] = {
                "device": str(served.device),
                "weights_on": str(next(served.network.parameters()).device),
                "rows": len(answers[device]),
                "statuses": sorted(set(answers[device]["status"])),
            }
    first, cpu = answers[bench.device], answers["cpu"]
    columns = [c for c in cpu.columns if c.startswith("p_")]
    result["probability_columns"] = columns
    result["max_abs_difference"] = float(
        np.abs(first[columns].to_numpy(float) - cpu[columns].to_numpy(float)).max()
    )
    result["same_statuses"] = bool((first["status"] == cpu["status"]).all())
    result["same_labels"] = bool((first["label"] == cpu["label"]).all())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny model, a few steps")
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting rows after")
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no GPU visible (use --device cpu for the smoke run)", file=sys.stderr)
        return 2
    bench = Bench.smoke(args.device) if args.smoke else Bench(device=args.device)
    budget = Budget(args.budget_s)
    report: dict[str, Any] = {"bench": asdict(bench), "budget_s": args.budget_s}
    out = Path(args.out)

    def save(key: str, value: Any, show: bool = True) -> None:
        report[key] = value
        report["elapsed_s"] = round(budget.elapsed(), 1)
        out.write_text(json.dumps(report, indent=2))
        if show:
            print(json.dumps({key: value}), flush=True)

    save("facts", device_facts(device))
    model: nn.Module | None = None
    for compiled in (False, True):
        model, stats = train_epoch(bench, compiled)
        save(f"train_{'compile' if compiled else 'eager'}", stats)
    assert model is not None
    save("serving", serve_both_ways(model, bench))
    del model
    rows: list[dict[str, Any]] = []

    def on_row(row: dict[str, Any]) -> None:
        rows.append(row)
        save("throughput", rows, show=False)  # bench_gpu prints each row

    with tempfile.TemporaryDirectory() as name:
        bench_gpu(Path(name), bench, budget, on_row=on_row)
    save("skipped", budget.skipped)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
