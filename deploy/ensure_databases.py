"""Create the databases the deployment needs besides Postgres's own, when they are missing.

docker-compose's ``postgres-databases`` step runs this before MLflow starts, on every ``up``:
a new volume and one made before a database was added both end with every database present
(Postgres runs its image's init scripts only on an empty volume, so this cannot be one).

The connection comes from libpq's environment (``PGHOST``, ``PGUSER``, ``PGPASSWORD``,
``PGDATABASE``): no password on a command line.

    python -m deploy.ensure_databases
"""

from __future__ import annotations

import sys

#: Databases created here (Postgres's POSTGRES_DB, ``airflow``, is made by Postgres itself).
DATABASES = ("mlflow",)


def ensure(names: tuple[str, ...] = DATABASES) -> list[str]:
    """Create each of ``names`` that does not exist yet; return the ones created."""
    import psycopg2
    from psycopg2 import sql

    created = []
    connection = psycopg2.connect(connect_timeout=10)
    try:
        connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with connection.cursor() as cursor:
            for name in names:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cursor.fetchone() is None:
                    cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                    created.append(name)
    finally:
        connection.close()
    return created


if __name__ == "__main__":
    try:
        made = ensure()
    except Exception as exc:  # one line for the container log, then exit 1
        print(f"error: cannot create the databases {', '.join(DATABASES)}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"databases ready (created: {', '.join(made) or 'none'})")
