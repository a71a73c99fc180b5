"""``python -m ml serve``: a registered model over HTTP, in this process.

MLflow's scoring protocol (``POST /invocations`` with ``dataframe_split`` JSON or CSV, ``GET
/ping``), served by MLflow's own scoring app under uvicorn in this Python, so nothing depends on
``PATH`` (``mlflow models serve`` starts ``uvicorn`` as a command). A request MLflow's app would
answer with a 500 (no ``Content-Type``, an empty body) is refused with a 400 that says what to
send.

Usage::

    MLFLOW_TRACKING_URI=http://mlflow:5000 python -m ml serve --port 5001
    printf '{"dataframe_split": {"columns": ["image"], "data": [["%s"]]}}' \\
        "$(base64 -w0 cat.jpg)" | curl -s localhost:5001/invocations \\
        -H 'Content-Type: application/json' --data-binary @-
"""

from __future__ import annotations

import json
from typing import Any

from ml.params import PARAMETERS
from ml.redact import get_logger

log = get_logger(__name__)

HOW = (
    'POST a JSON body {"dataframe_split": {"columns": ["image"], "data": [["<base64 of an '
    'image>"]]}} with Content-Type: application/json (or a CSV with text/csv)'
)


def refusal(method: str, path: str, headers: dict[str, str]) -> str:
    """Why a request to the scoring app is refused before it reaches MLflow, or ""."""
    if method != "POST" or path.rstrip("/") != "/invocations":
        return ""
    if not headers.get("content-type", "").strip():
        return f"no Content-Type: {HOW}"
    if headers.get("content-length", "").strip() == "0":
        return f"empty request: {HOW}"
    return ""


def scoring_app(model: Any) -> Any:
    """MLflow's scoring app for ``model`` (a loaded pyfunc), refusing bad requests with 400."""
    from fastapi import Request
    from fastapi.responses import Response
    from mlflow.pyfunc import scoring_server

    app = scoring_server.init(model)

    @app.middleware("http")  # type: ignore[untyped-decorator]
    async def refuse(request: Request, call_next: Any) -> Any:
        reason = refusal(request.method, request.url.path, dict(request.headers))
        if reason:
            body = json.dumps({"error_code": "BAD_REQUEST", "message": reason})
            return Response(body, status_code=400, media_type="application/json")
        return await call_next(request)

    return app


def serve(
    model_uri: str, host: str, port: int, device: str = PARAMETERS["device"].default
) -> dict[str, Any]:
    """Serve ``model_uri`` until interrupted; the summary once it stops."""
    import uvicorn

    from ml.mlflow_access import load_registered

    model = load_registered(model_uri, model_config={"device": device})
    app = scoring_app(model)
    log.info("serving %s at http://%s:%d/invocations (Ctrl-C stops)", model_uri, host, port)
    uvicorn.run(app, host=host, port=port, workers=1, log_level="warning", access_log=False)
    return {"served": model_uri, "address": f"http://{host}:{port}", "stopped": True}
