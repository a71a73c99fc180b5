"""One typed settings object for a pipeline run, built from run parameters and the environment.

Deployment settings (where the store is, which networks downloads may reach, the MLflow server)
come from the environment and are never run parameters: a person triggering a run from a form
must not be able to open the address policy. Run parameters (what to train, how) come from the
Airflow trigger form or the CLI, and are validated here with messages that name the parameter.

Usage: ``settings = PipelineSettings.from_params({"csv": "s3://b/in.csv", "epochs": 3})``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ml.containment import check_input, check_name, input_roots
from ml.errors import ParameterError, PipelineError
from ml.netpolicy import parse_networks

ENUMS = {
    "optimizer": ("sgd", "adamw"),
    "device": ("auto", "cuda", "cpu"),
    "precision": ("bf16", "fp16", "fp32"),
    "imbalance": ("class_weights", "sampler", "none"),
}
#: (minimum, maximum) for numeric parameters; None leaves a side open.
RANGES: dict[str, tuple[float | None, float | None]] = {
    "sample": (0, None),
    "min_confidence": (0.0, 1.0),
    "seed": (0, None),
    "download_concurrency": (1, 512),
    "download_batch_size": (1, None),
    "max_side": (0, 4096),
    "epochs": (1, 1000),
    "batch_size": (1, 4096),
    "learning_rate": (1e-8, 10.0),
    "image_size": (32, 1024),
    "head_epochs": (0, 1000),
    "patience": (0, 1000),
    "max_steps_per_epoch": (0, None),
    "promotion_margin": (0.0, 1.0),
    "workers": (0, 64),
}


__all__ = ["ParameterError", "PipelineSettings", "allowed_networks"]
#: Weights given by name (resolved by ml.model), as opposed to a file or an s3:// URI.
_WEIGHT_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")


@dataclass(frozen=True)
class PipelineSettings:
    """Everything one run of the pipeline needs; see the DAG's trigger form for descriptions."""

    # deployment (environment)
    store: str = ""
    allow_networks: tuple[str, ...] = ()
    # run parameters
    csv: str = ""
    sample: int = 0
    min_confidence: float = 0.0
    exclude_golden: bool = False
    ratios: str = "0.8,0.15,0.05"
    seed: int = 0
    download_concurrency: int = 32
    download_batch_size: int = 500
    max_side: int = 256
    weights: str = "IMAGENET1K_V2"
    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 0.01
    optimizer: str = "sgd"
    image_size: int = 224
    device: str = "auto"
    precision: str = "bf16"
    imbalance: str = "class_weights"
    head_epochs: int = 0
    patience: int = 3
    max_steps_per_epoch: int = 0
    workers: int = 4
    model_name: str = "image-sentiment"
    promotion_margin: float = 0.0

    @classmethod
    def from_params(
        cls, params: Mapping[str, Any], env: Mapping[str, str] | None = None
    ) -> PipelineSettings:
        """Validate ``params`` (unknown names are refused) and add the deployment settings."""
        env = os.environ if env is None else env
        names = {f.name for f in dataclasses.fields(cls)} - {"store", "allow_networks"}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ParameterError(
                f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        defaults = cls()
        values: dict[str, Any] = {}
        for name in names:
            default = getattr(defaults, name)
            value = params.get(name, default)
            values[name] = _coerce(name, value, default)
        store = env.get("ML_STORE", "")
        if not store.startswith("s3://"):
            raise ParameterError(
                "ML_STORE is not set to an s3://BUCKET/PREFIX URI in the "
                "environment of this worker; set it in the deployment"
            )
        networks = allowed_networks(env)
        settings = cls(store=store.rstrip("/"), allow_networks=networks, **values)
        settings._check()
        settings._contain(env)
        return settings

    def _contain(self, env: Mapping[str, str]) -> None:
        """Keep what the form names inside the pipeline (see ml.containment)."""
        roots = input_roots(env, self.store)
        default_csv = env.get("ML_CSV") or f"{self.store}/input/images.csv"
        check_input(self.csv, roots=roots, parameter="csv", trusted=(default_csv,))
        if not _WEIGHT_NAME.fullmatch(self.weights):
            check_input(
                self.weights,
                roots=roots,
                parameter="weights",
                trusted=tuple(filter(None, (env.get("ML_WEIGHTS"),))),
                urls=False,
            )
        check_name(self.model_name)

    def _check(self) -> None:
        if not self.csv:
            raise ParameterError(
                "parameter 'csv' is required: a local path, http(s) URL or "
                "s3:// URI of the CSV of image URLs and labels"
            )
        for name, allowed in ENUMS.items():
            if getattr(self, name) not in allowed:
                raise ParameterError(
                    f"parameter '{name}' must be one of {', '.join(allowed)}, "
                    f"got {getattr(self, name)!r}"
                )
        for name, (low, high) in RANGES.items():
            value = getattr(self, name)
            if (low is not None and value < low) or (high is not None and value > high):
                raise ParameterError(
                    f"parameter '{name}' must be between {low} and "
                    f"{high if high is not None else 'any'}, got {value}"
                )
        if self.head_epochs >= self.epochs:
            raise ParameterError("parameter 'head_epochs' must be below 'epochs'")
        from ml.splits import parse_ratios

        try:
            parse_ratios(self.ratios)
        except PipelineError as exc:
            raise ParameterError(f"parameter 'ratios': {exc}") from None


def allowed_networks(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The CIDRs in ``ML_ALLOW_NETWORKS`` (space- or comma-separated), checked."""
    env = os.environ if env is None else env
    networks = tuple(env.get("ML_ALLOW_NETWORKS", "").replace(",", " ").split())
    try:
        parse_networks(networks)
    except ValueError as exc:
        raise ParameterError(f"ML_ALLOW_NETWORKS: {exc}") from None
    return networks


def _coerce(name: str, value: Any, default: Any) -> Any:
    """The value as the default's type; a clear error instead of a TypeError later."""
    if value is None:
        return default
    kind = type(default)
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.strip().lower() in ("true", "1", "yes")
            return bool(value)
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind is float:
            return float(value)
        return str(value).strip()
    except (TypeError, ValueError):
        raise ParameterError(
            f"parameter '{name}' must be a {kind.__name__}, got {value!r}"
        ) from None
