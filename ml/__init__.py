"""Image Sentiment Pipeline: the work behind the Airflow DAG, usable without Airflow.

Usage: ``python -m ml --help`` lists the stages; each stage is also a plain function here.
"""

from __future__ import annotations

from ml.errors import PipelineError
from ml.labels import LABELS, normalize_label

__all__ = ["LABELS", "PipelineError", "normalize_label"]
__version__ = "0.1.0"
