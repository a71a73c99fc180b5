"""Training throughput of ResNet-152, and our input pipeline against torchvision's ImageFolder.

Depends only on torch, torchvision, Pillow and numpy (plus this repository's ``ml.transforms``
and ``devkit.imageserver``, which need nothing else), so it runs on a bare GPU machine.

    python -m benchmarks.train_throughput --part pipeline          # CPU: images/s per core
    python -m benchmarks.train_throughput --part gpu --batch 256   # GPU: fp32, bf16+cl, +compile

GPU part: images/s of full training steps (forward, backward, SGD) for fp32 eager with TF32
off (true fp32) and on (PyTorch's default for convolutions), bf16 autocast + channels_last, and
the same with torch.compile, on synthetic tensors; then with real JPEG files decoded by
DataLoader workers through our pipeline (uint8 crops, normalization on the GPU), the loader
warmed up first and the image set large enough that no timed step crosses an epoch boundary;
and last, one row with the trainer's own defaults (``TrainConfig()``: batch 64, bf16,
channels_last, SGD with Nesterov, label smoothing, gradient clipping, ``ml.loop``'s step), so
the figures say what a user gets, not only the best case. The real-JPEG rows feed the model
the trainer's way (one Normalizer, pinned batches copied without blocking) and each runs in an
epoch of its own, so no timed step waits on a new epoch's workers. TF32 is measured the way
PyTorch defaults it: for cuDNN convolutions only. ``--device cpu --smoke`` runs every row's code
on the CPU in seconds (the test suite does); ``--budget-s`` skips the rows left when time is up.

Pipeline part: one process, one thread, images/s per core of ImageFolder with the default PIL
loader and ToTensor/Normalize transforms against ours, on the same JPEG files (the 500 px
originals and the 256 px versions our downloader stores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

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


@dataclass(frozen=True)
class Bench:
    """What the GPU part measures: on which device, which network, how much."""

    device: str = "cuda"
    arch: str = "resnet152"
    size: int = 224
    batch: int = 256
    steps: int = 30
    workers: int = max(1, (os.cpu_count() or 2) - 2)
    compile_backend: str = "inductor"

    @classmethod
    def smoke(cls, device: str = "cpu") -> Bench:
        """Every row's code path in seconds (the test suite's run): ResNet-18 at 64 px, two
        steps, torch.compile with the ``eager`` backend (no C++ compiler needed)."""
        return cls(device, "resnet18", 64, 4, 2, 1, "eager")

    def warmup(self, compiled: bool) -> int:
        if self.steps <= 5:
            return 1
        return 15 if compiled else 5


class Budget:
    """Wall time left for the run: a row starts only when the time it needs (an estimate for
    the full-size GPU run: compiling takes minutes) is left, so the run ends within the budget;
    skipped rows are named in the report."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.perf_counter()
        self.skipped: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def allows(self, row: str, needs: float = 0.0) -> bool:
        if self.elapsed() + needs < self.seconds:
            return True
        self.skipped.append(row)
        return False


#: What a row needs on one H200, ResNet-152 at batch 256, by estimate (seconds): an eager
#: row, a compiled one (TorchInductor), and a row that also decodes JPEG files.
NEEDS = {"eager": 40.0, "compiled": 150.0, "jpeg": 60.0}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(bench: Bench, channels_last: bool, compile_model: bool) -> nn.Module:
    from ml.model import architecture

    model = architecture(bench.arch, CLASSES).to(bench.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_model:
        model = torch.compile(model, backend=bench.compile_backend)  # type: ignore[assignment]
    return model


def _steps(
    model: nn.Module,
    batches: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    bf16: bool,
    warmup: int,
    bench: Bench,
) -> float:
    device = torch.device(bench.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    model.train()

    def step() -> None:
        x, y = batches()
        with torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"
        ):
            loss = loss_fn(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(bench.steps):
        step()
    _sync(device)
    return _rate(bench.batch * bench.steps, time.perf_counter() - started)


def _tf32(convolutions: bool) -> None:
    """TF32 for cuDNN convolutions only (PyTorch's default); matrix multiplies stay fp32, as
    PyTorch's default also leaves them."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = convolutions


def images_needed(bench: Bench, rows: int = 2) -> int:
    """JPEG files for the real-image rows: each runs within one epoch of its own (warm-up and
    timed steps), so that no timed step waits on a new epoch's workers."""
    return bench.batch * (bench.warmup(compiled=True) + bench.steps + 1) + 1


def bench_gpu(
    folder: Path,
    bench: Bench,
    budget: Budget | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Training images/s on ``bench.device``: synthetic tensors in four precisions and
    layouts, then real JPEG files through the trainer's own input path, then the trainer's
    defaults. Rows past the budget are skipped (``budget.skipped``)."""
    from ml.transforms import Normalizer

    budget = budget or Budget(float("inf"))
    device = torch.device(bench.device)
    torch.backends.cudnn.benchmark = True
    rows: list[dict[str, Any]] = []

    def add(row: dict[str, Any]) -> None:
        rows.append({"part": "gpu", "device": bench.device, "batch": bench.batch, **row})
        print(json.dumps(rows[-1]), flush=True)
        if on_row:
            on_row(rows[-1])

    shape = (bench.batch, 3, bench.size, bench.size)
    x = torch.randn(*shape, device=device)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, CLASSES, (bench.batch,), device=device)
    modes = [
        ("fp32 eager, TF32 off (true fp32)", False, False, False, x, False),
        (
            "fp32 eager, TF32 for convolutions only (PyTorch's default)",
            False,
            False,
            False,
            x,
            True,
        ),
        ("bf16 + channels_last", True, True, False, x_cl, False),
        ("bf16 + channels_last + compile", True, True, True, x_cl, False),
    ]
    for name, bf16, cl, comp, inputs, tf32 in modes:
        if not budget.allows(f"synthetic tensors: {name}", NEEDS["compiled" if comp else "eager"]):
            continue
        _tf32(tf32)
        model = _model(bench, cl, comp)
        rate = _steps(model, lambda inputs=inputs: (inputs, y), bf16, bench.warmup(comp), bench)
        add({"input": "synthetic tensors", "mode": name, "images_per_s": rate})
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _tf32(True)

    make_images(folder, images_needed(bench), processes=1 if bench.device == "cpu" else 0)
    dataset = JpegFiles(folder / "stored", bench.size)
    cuda = device.type == "cuda"
    loader = DataLoader(
        dataset,
        batch_size=bench.batch,
        shuffle=True,
        num_workers=bench.workers,
        pin_memory=cuda,
        persistent_workers=bench.workers > 0,
        prefetch_factor=4 if bench.workers else None,
        drop_last=True,
    )
    # The trainer's input path (ml.loop.train_one_epoch): one Normalizer built once, pinned
    # uint8 batches copied without blocking, normalized and laid out on the device.
    normalizer = Normalizer(MEAN, STD, device, channels_last=True)
    for name, comp in (("bf16 + channels_last", False), ("bf16 + channels_last + compile", True)):
        row = f"JPEG files: {name}"
        if not budget.allows(row, NEEDS["compiled" if comp else "jpeg"]):
            continue
        model = _model(bench, True, comp)
        epoch = iter(loader)  # a fresh epoch per row: no timed step crosses its end

        def real(epoch: Any = epoch) -> tuple[torch.Tensor, torch.Tensor]:
            images, targets = next(epoch)
            return normalizer(images), targets.to(device, non_blocking=True)

        rate = _steps(model, real, True, bench.warmup(comp), bench)
        add({"input": f"JPEG files, {bench.workers} workers", "mode": name, "images_per_s": rate})
        del model, epoch
        if cuda:
            torch.cuda.empty_cache()
    if budget.allows("trainer defaults", NEEDS["jpeg"]):
        changes: dict[str, Any] = {"workers": bench.workers}
        if bench.arch != "resnet152":
            changes.update(arch=bench.arch, image_size=bench.size, batch_size=bench.batch)
        add(bench_trainer_defaults(folder, bench.steps, bench.device, **changes))
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
    parser.add_argument("--device", default="cuda", help="the GPU part's device (cpu: smoke)")
    parser.add_argument("--smoke", action="store_true", help="GPU part: tiny model, two steps")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="GPU part's limit")
    parser.add_argument("--images", type=int, default=2000, help="pipeline part's images")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workers", type=int, default=Bench.workers)
    parser.add_argument(
        "--pipeline-images",
        type=int,
        default=500,
        help="images timed per pipeline (default: %(default)s)",
    )
    parser.add_argument("--out", default="", help="also write the figures to this JSON file")
    args = parser.parse_args()
    bench = (
        Bench.smoke(args.device)
        if args.smoke
        else Bench(args.device, "resnet152", args.size, args.batch, args.steps, args.workers)
    )
    info = {
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    print(json.dumps(info), flush=True)
    rows: list[dict[str, Any]] = []
    budget = Budget(args.budget_s)
    if args.part in ("all", "pipeline"):
        with tempfile.TemporaryDirectory() as name:
            make_images(Path(name), args.images)
            rows += bench_pipeline(Path(name), args.size, args.pipeline_images)
    if args.part in ("all", "gpu"):
        if bench.device.startswith("cuda") and not torch.cuda.is_available():
            print(
                "no GPU: skipping the GPU part (--device cpu runs it on the CPU)", file=sys.stderr
            )
        else:
            with tempfile.TemporaryDirectory() as name:
                rows += bench_gpu(Path(name), bench, budget)
    if args.out:
        report = {"info": info, "rows": rows, "skipped": budget.skipped}
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
