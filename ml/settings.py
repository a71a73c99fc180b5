"""One settings object for a pipeline run, built from run parameters and the environment.

Deployment settings (where the store is, which networks downloads may reach, the MLflow server)
come from the environment and are never run parameters: a person triggering a run from a form
must not be able to open the address policy. Run parameters (what to train, how) come from the
Airflow trigger form or the CLI; which exist, their types, ranges and defaults are declared once
in :mod:`ml.params`, and every value is checked here with messages that name the parameter.

Usage: ``settings = PipelineSettings.from_params({"csv": "s3://b/in.csv", "epochs": 3})``;
``settings.epochs`` is 3 (every form parameter is a typed field).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ml.containment import check_input, check_name, input_roots
from ml.errors import ParameterError, PipelineError
from ml.netpolicy import parse_networks
from ml.params import FORM
from ml.params import PARAMETERS as P

__all__ = ["ParameterError", "PipelineSettings", "allowed_networks"]
#: Weights given by name (resolved by ml.model), as opposed to a file or an s3:// URI.
_WEIGHT_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")


@dataclass(frozen=True)
class PipelineSettings:
    """Everything one run of the pipeline needs: the deployment's ``store`` and
    ``allow_networks``, and every form parameter as a typed field, checked. The fields'
    defaults are the declarations of :mod:`ml.params` (a test keeps the two the same set)."""

    store: str = ""
    allow_networks: tuple[str, ...] = ()
    csv: str = P["csv"].field()
    sample: int = P["sample"].field()
    min_confidence: float = P["min_confidence"].field()
    exclude_golden: bool = P["exclude_golden"].field()
    seed: int = P["seed"].field()
    ratios: str = P["ratios"].field()
    download_concurrency: int = P["download_concurrency"].field()
    download_batch_size: int = P["download_batch_size"].field()
    max_side: int = P["max_side"].field()
    weights: str = P["weights"].field()
    epochs: int = P["epochs"].field()
    batch_size: int = P["batch_size"].field()
    learning_rate: float = P["learning_rate"].field()
    optimizer: str = P["optimizer"].field()
    imbalance: str = P["imbalance"].field()
    agreement_weighting: bool = P["agreement_weighting"].field()
    head_epochs: int = P["head_epochs"].field()
    image_size: int = P["image_size"].field()
    device: str = P["device"].field()
    precision: str = P["precision"].field()
    patience: int = P["patience"].field()
    workers: int = P["workers"].field()
    max_steps_per_epoch: int = P["max_steps_per_epoch"].field()
    model_name: str = P["model_name"].field()
    promotion_margin: float = P["promotion_margin"].field()
    promotion_resamples: int = P["promotion_resamples"].field()
    promotion_confidence: float = P["promotion_confidence"].field()
    promotion_band: str = P["promotion_band"].field()
    force_retrain: bool = P["force_retrain"].field()

    @property
    def values(self) -> dict[str, Any]:
        """Every form parameter's value, by name."""
        return {p.name: getattr(self, p.name) for p in FORM}

    @classmethod
    def from_params(
        cls, params: Mapping[str, Any], env: Mapping[str, str] | None = None
    ) -> PipelineSettings:
        """Check ``params`` (unknown names are refused) and add the deployment settings."""
        env = os.environ if env is None else env
        names = [p.name for p in FORM]
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise ParameterError(
                f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        values = {
            p.name: p.check(params[p.name])
            if params.get(p.name) is not None
            else p.default_for(env)
            for p in FORM
        }
        store = env.get("ML_STORE", "")
        if not store.startswith("s3://"):
            raise ParameterError(
                "ML_STORE is not set to an s3://BUCKET/PREFIX URI in the "
                "environment of this worker; set it in the deployment"
            )
        settings = cls(store=store.rstrip("/"), allow_networks=allowed_networks(env), **values)
        settings._check()
        settings._contain(env)
        return settings

    def _check(self) -> None:
        """The rules between parameters (each one alone was checked against its declaration)."""
        if not self.csv:
            raise ParameterError(
                "parameter 'csv' is required: an http(s) URL, or an s3:// URI or path of the "
                "CSV of image URLs and labels"
            )
        if self.head_epochs >= self.epochs:
            raise ParameterError("parameter 'head_epochs' must be below 'epochs'")
        from ml.splits import parse_ratios

        try:
            parse_ratios(self.ratios)
        except PipelineError as exc:
            raise ParameterError(f"parameter 'ratios': {exc}") from None

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


def allowed_networks(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The CIDRs in ``ML_ALLOW_NETWORKS`` (space- or comma-separated), checked."""
    env = os.environ if env is None else env
    networks = tuple(env.get("ML_ALLOW_NETWORKS", "").replace(",", " ").split())
    try:
        parse_networks(networks)
    except ValueError as exc:
        raise ParameterError(f"ML_ALLOW_NETWORKS: {exc}") from None
    return networks


def form_defaults(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Each form parameter's default, with the deployment's overrides (``ML_SAMPLE``, ...)."""
    return {p.name: p.default_for(env) for p in FORM}
