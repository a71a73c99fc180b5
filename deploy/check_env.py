"""Refuse to start the deployment with placeholder or missing secrets (docker-compose's first
service; everything else waits for it).

Each secret the deployment uses must be set, must not be a placeholder from .env.example
(``change-me...``), and must be long enough; the Fernet key must be a valid one. The message
names every variable at fault and says how to generate them: ``python3 -m deploy.init_env``.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import sys

#: (variable, minimum length) for every secret docker-compose.yaml passes on.
SECRETS = {
    "POSTGRES_PASSWORD": 12,
    "REDIS_PASSWORD": 12,
    "MINIO_ROOT_PASSWORD": 12,
    "MLFLOW_ADMIN_PASSWORD": 12,
    "MLFLOW_PIPELINE_PASSWORD": 12,
    "MLFLOW_SECRET_KEY": 24,
    "AIRFLOW_ADMIN_PASSWORD": 12,
    "AIRFLOW_JWT_SECRET": 24,
    "AIRFLOW_API_SECRET_KEY": 24,
    "AIRFLOW_FERNET_KEY": 44,
}
PLACEHOLDER = "change-me"
#: Secrets written into the database and broker URLs: only characters a URL keeps as they are.
IN_URLS = ("POSTGRES_USER", "POSTGRES_PASSWORD", "REDIS_PASSWORD")
_URL_SAFE = re.compile(r"[A-Za-z0-9._~-]*")


def problems(env: dict[str, str]) -> list[str]:
    found = []
    for name, minimum in SECRETS.items():
        value = env.get(name, "")
        if not value:
            found.append(f"{name} is empty")
        elif PLACEHOLDER in value.lower():
            found.append(f"{name} is still the placeholder from .env.example")
        elif len(value) < minimum:
            found.append(f"{name} is shorter than {minimum} characters")
    for name in IN_URLS:
        if not _URL_SAFE.fullmatch(env.get(name, "")):
            found.append(
                f"{name} has characters that break the database and broker URLs "
                "(use letters, digits and . _ ~ -)"
            )
    fernet = env.get("AIRFLOW_FERNET_KEY", "")
    if fernet and PLACEHOLDER not in fernet.lower():
        try:
            valid = len(base64.urlsafe_b64decode(fernet.encode())) == 32
        except (binascii.Error, ValueError):
            valid = False
        if not valid:
            found.append("AIRFLOW_FERNET_KEY is not a Fernet key (32 bytes, url-safe base64)")
    return found


def main() -> int:
    found = problems(dict(os.environ))
    if found:
        print(
            "error: the deployment's secrets are not set: "
            + "; ".join(found)
            + ". Generate them once with: python3 -m deploy.init_env (writes .env), then "
            "docker compose up -d",
            file=sys.stderr,
        )
        return 1
    print("secrets are set")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
