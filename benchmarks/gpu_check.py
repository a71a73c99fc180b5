"""What only a GPU can show, in one prepared run: train on CUDA, serve on CUDA and on the CPU.

1. One short epoch of ResNet-152 through the trainer's own step (``ml.loop``) on CUDA with bf16
   and channels_last, eager and with ``torch.compile``; loss must be finite and the weights must
   move.
2. The served model (``ml.serving``: the artifacts MLflow logs) exported from the CUDA-trained
   weights and loaded back once with ``device=cuda`` and once with ``device=cpu``; both must
   predict the same probabilities (to bf16/fp32 tolerance) on the same input.
3. The throughput benchmark (``train_throughput.py --part gpu``).

It needs torch, torchvision, NumPy, Pillow, scikit-learn and MLflow (for the pyfunc base
class; no server). On a bare GPU machine carry MLflow as wheels (see the device README).

    python benchmarks/gpu_check.py --out gpu_check.json            # about 5 minutes on an H200
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ml.loop import make_step, train_one_epoch  # noqa: E402
from ml.model import Classifier, architecture  # noqa: E402
from ml.runtime import Runtime  # noqa: E402
from ml.train_config import TrainConfig  # noqa: E402
from ml.transforms import Normalizer, Preprocessing  # noqa: E402


def train_epoch(compile_model: bool, steps: int) -> tuple[nn.Module, dict[str, Any]]:
    cfg = TrainConfig(split="s3://check/x", compile=compile_model, max_steps_per_epoch=steps)
    rt = Runtime(0, 1, 0, torch.device("cuda"))
    torch.backends.cudnn.benchmark = True
    generator = torch.Generator().manual_seed(0)
    n = cfg.batch_size * steps
    images = torch.randint(
        0, 256, (n, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, generator=generator
    )
    loader = DataLoader(
        TensorDataset(images, torch.arange(n) % 5),
        batch_size=cfg.batch_size,
        drop_last=True,
        pin_memory=True,
    )
    model = architecture(cfg.arch).cuda().to(memory_format=torch.channels_last)
    before = model.fc.weight.detach().clone()
    normalizer = Normalizer(Preprocessing().mean, Preprocessing().std, rt.device)
    step = make_step(model, cfg, rt, steps, normalizer)
    trained: nn.Module = torch.compile(model) if compile_model else model  # type: ignore[assignment]
    trained.train()
    started = time.perf_counter()
    stats = train_one_epoch(trained, loader, step, cfg, rt)
    stats["wall_s"] = time.perf_counter() - started
    stats["finite"] = bool(np.isfinite(stats["train_loss"]))
    stats["weights_moved"] = not torch.equal(before, model.fc.weight.detach())
    return model, stats


def serve_both_ways(model: nn.Module) -> dict[str, Any]:
    from ml.serving import SentimentModel, export

    preprocessing = Preprocessing()
    classifier = Classifier(
        model.float().to(memory_format=torch.contiguous_format),
        preprocessing.mean,
        preprocessing.std,
    )
    x = np.random.default_rng(0).random((4, 3, 224, 224), dtype=np.float32)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as name:
        artifacts = export(
            classifier,
            Path(name),
            {
                "arch": "resnet152",
                "labels": ["a", "b", "c", "d", "e"],
                "preprocessing": preprocessing.to_dict(),
            },
        )
        outputs = {}
        for device in ("cuda", "cpu"):

            class Context:
                def __init__(self, device: str = device) -> None:
                    self.artifacts = artifacts
                    self.model_config = {"device": device}

            served = SentimentModel()
            served.load_context(Context())
            assert served.model is not None
            outputs[device] = served.predict(None, x)
            results[device] = {
                "device": str(next(served.model.parameters()).device),
                "shape": list(outputs[device].shape),
            }
        results["max_abs_difference"] = float(np.abs(outputs["cuda"] - outputs["cpu"]).max())
        results["same_labels"] = bool((outputs["cuda"].argmax(1) == outputs["cpu"].argmax(1)).all())
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: no GPU visible", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    for compiled in (False, True):
        model, stats = train_epoch(compiled, args.steps)
        report[f"train_{'compile' if compiled else 'eager'}"] = stats
        print(json.dumps({"compile": compiled, **stats}), flush=True)
    report["serving"] = serve_both_ways(model)
    print(json.dumps(report["serving"]), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    if not args.skip_throughput:
        subprocess.run(
            [
                sys.executable,
                str(REPO / "benchmarks" / "train_throughput.py"),
                "--part",
                "gpu",
                "--out",
                str(Path(args.out).with_suffix(".bench.json")),
            ],
            check=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
