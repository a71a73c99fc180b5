"""Write .env for docker-compose from .env.example, with every secret generated.

    python3 -m deploy.init_env          # writes .env; on an existing one, adds only the
                                        # settings it lacks (a newer .env.example's)
    python3 -m deploy.init_env --force  # regenerate (new secrets: existing data won't open)

Secrets (the names in deploy/check_env.py) get fresh random values, the Fernet key a valid
key; everything else keeps the example's value. Standard library only. (The images' code
version is not a setting: it is passed when they are built, see docker-compose.yaml.)
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import secrets
import sys
from pathlib import Path

from deploy.check_env import SECRETS, problems

REPO = Path(__file__).resolve().parent.parent


def secret_value(name: str) -> str:
    if name == "AIRFLOW_FERNET_KEY":
        return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
    return secrets.token_urlsafe(max(24, SECRETS[name]))


def render(example: str) -> str:
    lines = []
    for line in example.splitlines():
        name, sep, _ = line.partition("=")
        if sep and name in SECRETS:
            lines.append(f"{name}={secret_value(name)}")
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


def parse_env(text: str) -> dict[str, str]:
    """``NAME=value`` lines of a .env text (comments and blank lines skipped)."""
    values = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            values[name.strip()] = value.strip()
    return values


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner can read, from its first byte (it holds
    secrets)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)


def add_missing(path: Path, example: str) -> list[str]:
    """Append to the .env at ``path`` each setting of ``example`` it lacks (secrets generated),
    keeping every existing value; return the names added."""
    have = parse_env(path.read_text())
    wanted = parse_env(render(example))
    missing = [name for name in wanted if name not in have]
    if missing:
        text = path.read_text()
        lines = "".join(f"{name}={wanted[name]}\n" for name in missing)
        write_private(path, text + ("" if text.endswith("\n") else "\n") + lines)
    return missing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="overwrite an existing .env")
    parser.add_argument("--example", default=str(REPO / ".env.example"))
    parser.add_argument("--out", default=str(REPO / ".env"))
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists() and not args.force:
        added = add_missing(out, Path(args.example).read_text())
        if added:
            print(f"added to {out}, keeping its values: {', '.join(added)}")
            return 0
        print(
            f"error: {out} exists; keep it, or pass --force to generate new secrets "
            "(the existing databases then need the old ones)",
            file=sys.stderr,
        )
        return 2
    text = render(Path(args.example).read_text())
    env = parse_env(text)
    assert not problems(env), problems(env)
    write_private(out, text)
    print(f"wrote {out} with generated secrets; next: docker compose up -d --build")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
