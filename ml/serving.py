"""The registered model: what ``models:/image-sentiment@champion`` loads, on a CPU or a GPU.

It is logged with MLflow's *models from code* (no pickled object): the weights are a plain
``state_dict`` (loaded with ``weights_only=True``), ``model.json`` names the architecture, the
labels and the :class:`~ml.transforms.Preprocessing`, and the ``ml`` package travels with the
model as code. The device is chosen when the model is loaded, never when it was trained: CUDA
when a GPU is visible (or ``model_config={"device": "cpu"|"cuda"|"cuda:N"}``), and the weights
are moved there, so a model trained anywhere serves anywhere.

Input: float32 RGB in [0, 1], shape (N, 3, H, W); output: class probabilities (N, 5).

Usage: ``mlflow.pyfunc.load_model("models:/image-sentiment@champion").predict(x)``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.pyfunc.model import PythonModel

from ml.model import Classifier, architecture
from ml.runtime import choose_device

#: The models-from-code script MLflow runs to build the model (it calls ``set_model``).
ENTRY = Path(__file__).with_name("_served_model.py")
PACKAGE = Path(__file__).parent


class SentimentModel(PythonModel):
    """The pyfunc behind the registered model; ``decide`` picks the device (injectable)."""

    #: The logged signature is this model's schema, not predict's type hints.
    _skip_type_hint_validation = True

    def __init__(self, decide: Callable[[str], torch.device] = choose_device) -> None:
        self._decide = decide
        self.model: Classifier | None = None
        self.device = torch.device("cpu")
        self.config: dict[str, Any] = {}

    def load_context(self, context: Any) -> None:
        self.config = json.loads(Path(context.artifacts["config"]).read_text())
        preference = str((context.model_config or {}).get("device", "auto"))
        self.device = self._decide(preference)
        preprocessing = self.config["preprocessing"]
        classifier = Classifier(
            architecture(self.config["arch"], len(self.config["labels"])),
            preprocessing["mean"],
            preprocessing["std"],
        )
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        classifier.load_state_dict(state)
        self.model = classifier.to(self.device).eval()

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        if self.model is None:
            raise RuntimeError("the model was not loaded (load_context was not called)")
        array = np.asarray(model_input, dtype=np.float32)
        with torch.inference_mode():
            x = torch.from_numpy(array).to(self.device)
            return self.model(x).float().cpu().numpy()


def export(classifier: Classifier, folder: Path, config: dict[str, Any]) -> dict[str, str]:
    """Write the artifacts :class:`SentimentModel` loads; returns MLflow's ``artifacts`` map."""
    weights, manifest = folder / "weights.pt", folder / "model.json"
    state = {k: v.detach().to("cpu").contiguous() for k, v in classifier.state_dict().items()}
    torch.save(state, weights)
    manifest.write_text(json.dumps(config, indent=2))
    return {"weights": str(weights), "config": str(manifest)}
