"""Training throughput of ResNet-152, and our input pipeline against torchvision's ImageFolder.

Depends only on torch, torchvision, Pillow and numpy (plus this repository's ``ml.transforms``
and ``devkit.imageserver``, which need nothing else), so it runs on a bare GPU machine.

    python benchmarks/train_throughput.py --part pipeline          # CPU: images/s per core
    python benchmarks/train_throughput.py --part gpu --batch 256   # GPU: fp32, bf16+cl, +compile

GPU part: images/s of full training steps (forward, backward, SGD) for fp32 eager with TF32
off (true fp32) and on (PyTorch's default for convolutions), bf16 autocast + channels_last, and
the same with torch.compile, on synthetic tensors; then with real JPEG files decoded by
DataLoader workers through our pipeline (uint8 crops, normalization on the GPU), the loader
warmed up first and the image set large enough that no timed step crosses an epoch boundary;
and last, one row with the trainer's own defaults (``TrainConfig()``: batch 64, bf16,
channels_last, SGD with Nesterov, label smoothing, gradient clipping, ``ml.loop``'s step), so
the figures say what a user gets, not only the best case. Pipeline part: one process, one
thread, images/s per core of ImageFolder with the default PIL loader and ToTensor/Normalize
transforms against ours, on the same JPEG files (the 500 px originals and the 256 px versions
our downloader stores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devkit.imageserver import render_image
from ml.transforms import decode, to_model_input, train_transform

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CLASSES = 5


def _write_one(job: tuple[Path, int]) -> None:
    folder, i = job
    image = render_image(f"bench-{i}", width=500, height=375, detail=8.0 + (i % 32))
    out = folder / "original" / f"c{i % CLASSES}" / f"{i}.jpg"
    image.save(out, format="JPEG", quality=88)
    small = image.resize((341, 256), Image.Resampling.BILINEAR)
    small.save(folder / "stored" / f"c{i % CLASSES}" / f"{i}.jpg", format="JPEG", quality=90)


def make_images(folder: Path, count: int, processes: int = 0) -> None:
    """``count`` JPEGs at 500x375 (like the source photos) and at 341x256 (as we store them);
    ``processes=1`` writes them in this process (no fork: safe in a threaded program)."""
    for kind in ("original", "stored"):
        for c in range(CLASSES):
            (folder / kind / f"c{c}").mkdir(parents=True, exist_ok=True)
    jobs = [(folder, i) for i in range(count)]
    if processes == 1:
        for job in jobs:
            _write_one(job)
        return
    with Pool(processes or os.cpu_count() or 1) as pool:
        pool.map(_write_one, jobs, chunksize=64)


class JpegFiles(Dataset[tuple[torch.Tensor, int]]):
    """Our pipeline over files: bytes -> uint8 decode -> uint8 crop/flip."""

    def __init__(self, root: Path, size: int) -> None:
        self.files = sorted(root.rglob("*.jpg"))
        self.transform = train_transform(size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.files[index]
        return self.transform(decode(path.read_bytes())), int(path.parent.name[1:])


def _rate(items: int, seconds: float) -> float:
    return round(items / seconds, 1)


def bench_pipeline(folder: Path, size: int, limit: int, repeats: int = 3) -> list[dict[str, Any]]:
    from torchvision import datasets, transforms

    torch.set_num_threads(1)
    rows = []
    for kind in ("original", "stored"):
        root = folder / kind
        reference = datasets.ImageFolder(
            root,
            transform=transforms.Compose(
                [
                    transforms.RandomResizedCrop(size),
                    transforms.RandomHorizontalFlip(),
                    transforms.ToTensor(),
                    transforms.Normalize(MEAN, STD),
                ]
            ),
        )
        ours = JpegFiles(root, size)
        n = min(limit, len(ours))
        for name, dataset, finish in (
            ("ImageFolder + PIL + ToTensor/Normalize", reference, None),
            ("ours: uint8 decode + crop (normalize on device)", ours, None),
            ("ours + normalize on this CPU", ours, _cpu_normalize),
        ):
            rates = []
            for _ in range(repeats):  # best of a few: the least disturbed by the machine
                started = time.perf_counter()
                batch = []
                for i in range(n):
                    batch.append(dataset[i][0])
                    if finish is not None and len(batch) == 32:
                        finish(batch)
                        batch = []
                rates.append(_rate(n, time.perf_counter() - started))
            rows.append(
                {
                    "part": "pipeline",
                    "images": kind,
                    "pipeline": name,
                    "images_per_s_per_core": max(rates),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _cpu_normalize(batch: list[torch.Tensor]) -> None:
    to_model_input(torch.stack(batch), torch.device("cpu"), MEAN, STD, channels_last=False)


def _model(channels_last: bool, compile_model: bool) -> nn.Module:
    from torchvision.models import resnet152

    model = resnet152(weights=None)
    model.fc = nn.Linear(model.fc.in_features, CLASSES)
    model = model.cuda()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_model:
        model = torch.compile(model)  # type: ignore[assignment]
    return model


def _steps(
    model: nn.Module,
    batches: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    bf16: bool,
    warmup: int,
    steps: int,
    batch: int,
) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    model.train()

    def step() -> None:
        x, y = batches()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return _rate(batch * steps, time.perf_counter() - started)


def _tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def bench_gpu(
    folder: Path, size: int, batch: int, steps: int, workers: int
) -> list[dict[str, Any]]:
    torch.backends.cudnn.benchmark = True
    rows = []
    x_cl = torch.randn(batch, 3, size, size, device="cuda").contiguous(
        memory_format=torch.channels_last
    )
    x = torch.randn(batch, 3, size, size, device="cuda")
    y = torch.randint(0, CLASSES, (batch,), device="cuda")
    modes = [
        ("fp32 eager, TF32 off (true fp32)", False, False, False, x, False),
        ("fp32 eager, TF32 on (PyTorch's default for convolutions)", False, False, False, x, True),
        ("bf16 + channels_last", True, True, False, x_cl, False),
        ("bf16 + channels_last + compile", True, True, True, x_cl, False),
    ]
    for name, bf16, cl, comp, inputs, tf32 in modes:
        _tf32(tf32)
        model = _model(cl, comp)
        rate = _steps(
            model, lambda inputs=inputs: (inputs, y), bf16, 15 if comp else 5, steps, batch
        )
        rows.append(
            {
                "part": "gpu",
                "input": "synthetic tensors",
                "mode": name,
                "batch": batch,
                "images_per_s": rate,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        del model
        torch.cuda.empty_cache()
    _tf32(False)

    dataset = JpegFiles(folder / "stored", size)
    loader = DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        pin_memory=True,
        persistent_workers=True,
        prefetch_factor=4,
        drop_last=True,
    )

    def endless() -> Any:
        while True:
            yield from loader

    stream = endless()
    for _ in range(max(5, workers)):  # warm: workers started, prefetch queues full
        next(stream)
    started, seen = time.perf_counter(), 0
    for _ in range(steps):
        images, _ = next(stream)
        seen += len(images)
    rows.append(
        {
            "part": "gpu",
            "input": f"JPEG files, {workers} workers",
            "mode": "loader only",
            "batch": batch,
            "images_per_s": _rate(seen, time.perf_counter() - started),
        }
    )
    print(json.dumps(rows[-1]), flush=True)
    for name, comp in (("bf16 + channels_last", False), ("bf16 + channels_last + compile", True)):
        model = _model(True, comp)

        def real() -> tuple[torch.Tensor, torch.Tensor]:
            images, targets = next(stream)
            return (
                to_model_input(images, torch.device("cuda"), MEAN, STD),
                targets.cuda(non_blocking=True),
            )

        rate = _steps(model, real, True, 15 if comp else 5, steps, batch)
        rows.append(
            {
                "part": "gpu",
                "input": f"JPEG files, {workers} workers",
                "mode": name,
                "batch": batch,
                "images_per_s": rate,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        del model
        torch.cuda.empty_cache()
    rows.append(bench_trainer_defaults(folder, steps))
    print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_trainer_defaults(
    folder: Path, steps: int, device: str = "cuda", **changes: Any
) -> dict[str, Any]:
    """The trainer's own step and loader settings (``TrainConfig()``), ResNet-152 at 224 px
    (``changes`` override fields: the test suite runs a small one on the CPU)."""
    from ml.loop import make_step, train_one_epoch
    from ml.model import architecture
    from ml.runtime import Runtime, seed_worker
    from ml.train_config import TrainConfig
    from ml.transforms import Normalizer

    cfg = TrainConfig(split="s3://bench/x", max_steps_per_epoch=steps, **changes)
    rt = Runtime(0, 1, 0, torch.device(device))
    dataset = JpegFiles(folder / "stored", cfg.image_size)
    workers = (
        {"num_workers": cfg.workers, "persistent_workers": True, "prefetch_factor": 4}
        if cfg.workers
        else {}
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        pin_memory=rt.device.type == "cuda",
        drop_last=True,
        worker_init_fn=seed_worker,
        **workers,
    )
    model = architecture(cfg.arch).to(rt.device).to(memory_format=torch.channels_last)
    step = make_step(model, cfg, rt, steps, Normalizer(MEAN, STD, rt.device, channels_last=True))
    model.train()
    warm = TrainConfig(split="x", max_steps_per_epoch=min(10, steps), **changes)
    train_one_epoch(model, loader, step, warm, rt)
    stats = train_one_epoch(model, loader, step, cfg, rt)
    return {
        "part": "gpu",
        "input": f"JPEG files, {cfg.workers} workers (trainer default)",
        "mode": f"trainer defaults: {cfg.precision}, channels_last, SGD, clip {cfg.clip_grad}",
        "batch": cfg.batch_size,
        "images_per_s": round(stats["train_images_per_s"], 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("all", "gpu", "pipeline"), default="all")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument(
        "--pipeline-images",
        type=int,
        default=500,
        help="images timed per pipeline (default: %(default)s)",
    )
    parser.add_argument("--out", default="", help="also write the figures to this JSON file")
    args = parser.parse_args()

    info = {
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    print(json.dumps(info), flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        started = time.perf_counter()
        images = args.images
        if args.part in ("all", "gpu"):  # no timed step may cross an epoch boundary
            images = max(images, args.batch * (args.steps + 20 + max(5, args.workers)) + 1)
        make_images(folder, images)
        print(
            json.dumps({"generated": images, "seconds": round(time.perf_counter() - started, 1)}),
            flush=True,
        )
        if args.part in ("all", "pipeline"):
            rows += bench_pipeline(folder, args.size, args.pipeline_images)
        if args.part in ("all", "gpu"):
            if not torch.cuda.is_available():
                print("no GPU: skipping the GPU part", file=sys.stderr)
            else:
                rows += bench_gpu(folder, args.size, args.batch, args.steps, args.workers)
    if args.out:
        Path(args.out).write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
