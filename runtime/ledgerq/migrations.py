"""Bring a database's ``ledgerq`` schema up to date.

``migrate()`` applies the yoyo migrations in ``sql/migrations/`` (forward only),
then re-applies every file in ``sql/functions/`` (``CREATE OR REPLACE``), all
under one advisory lock so two processes migrating at once take turns. It is
idempotent: running it again changes nothing but the function bodies.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import psycopg
from psycopg import sql
from yoyo import get_backend, read_migrations

from ledgerq import errors

SCHEMA = "ledgerq"
# pg_advisory_lock key: any constant works as long as only migrate uses it.
MIGRATE_LOCK_KEY = 0x6C656467657271  # "ledgerq"


def sql_dir() -> Path:
    """The SQL shipped with this ledgerq: inside the wheel, or the repository's."""
    packaged = Path(str(importlib.resources.files("ledgerq"))) / "sql"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "sql"


def function_files() -> list[Path]:
    return sorted((sql_dir() / "functions").glob("*.sql"))


def migration_files() -> list[Path]:
    return sorted((sql_dir() / "migrations").glob("*.sql"))


def _yoyo_url(database_url: str) -> str:
    parts = urlsplit(database_url)
    query = dict(parse_qsl(parts.query))
    query["schema"] = SCHEMA
    return parts._replace(scheme="postgresql+psycopg", query=urlencode(query)).geturl()


def migrate(database_url: str) -> list[str]:
    """Apply pending migrations and re-apply the functions; return the migrations applied."""
    try:
        with psycopg.connect(database_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATE_LOCK_KEY,))
            try:
                conn.execute(
                    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SCHEMA))
                )
                applied = _apply_migrations(database_url)
                _apply_functions(conn)
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATE_LOCK_KEY,))
    except psycopg.OperationalError as exc:
        raise errors.LedgerUnavailable(
            f"cannot reach PostgreSQL: {errors.first_line(exc)}"
        ) from exc
    except psycopg.Error as exc:
        raise errors.LedgerError(f"migration failed: {errors.first_line(exc)}") from exc
    return applied


def _apply_migrations(database_url: str) -> list[str]:
    backend = get_backend(_yoyo_url(database_url))
    try:
        migrations = read_migrations(str(sql_dir() / "migrations"))
        with backend.lock():
            pending = backend.to_apply(migrations)
            backend.apply_migrations(pending)
        return [m.id for m in pending]
    finally:
        backend.connection.close()


def _apply_functions(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    with conn.transaction():
        # Bodies may call functions defined in a later file; they are resolved
        # when called, as pg_dump restores them.
        conn.execute("SET LOCAL check_function_bodies = off")
        for path in function_files():
            conn.execute(path.read_text().encode())


def show(name: str) -> str:
    """The raw SQL of one migration (by number or file name), for operators' own tools."""
    for path in migration_files():
        if path.name == name or path.name.startswith(name.zfill(4) + "_") or path.stem == name:
            return path.read_text()
    known = ", ".join(p.stem for p in migration_files())
    raise errors.ConfigError(f"no migration {name!r}; known: {known}")
