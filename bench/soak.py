"""The long soak: real `ledgerq` processes under load while workers are killed
(-9) and a private Redis is flushed, then lost / duplicated / stale counts
(each must be 0). tests/py/test_e2e_soak.py runs a short one in CI.

    .venv/bin/python bench/soak.py                       # 20,000 tasks, 40 kills, 10 flushes
    .venv/bin/python bench/soak.py --tasks 2000 --kills 5 --flushes 2

It makes a database of its own on LEDGERQ_BENCH_ADMIN_URL's server (dropped
afterwards) and starts a redis-server of its own. Exit status 1 if anything was
lost, duplicated or stale.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import uuid
from pathlib import Path

import psycopg

from ledgerq import migrations

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "py"))

import e2e_servers  # noqa: E402
import soak_support  # noqa: E402

ADMIN_URL = os.environ.get(
    "LEDGERQ_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--waves", type=int, default=100)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--kills", type=int, default=40)
    parser.add_argument("--flushes", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait at the end")
    args = parser.parse_args()

    name = f"ledgerq_soak_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        migrations.migrate(url)
        with (
            tempfile.TemporaryDirectory(prefix="ledgerq-soak-") as root,
            e2e_servers.PrivateRedis(Path(root) / "redis") as redis,
        ):
            report = soak_support.run_soak(
                Path(root) / "soak", url, redis,
                tasks=args.tasks, waves=args.waves, workers=args.workers,
                kills=args.kills, flushes=args.flushes, timeout_s=args.timeout,
            )  # fmt: skip
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print(report.line())
    print("| measure | result |")
    print("|---|---|")
    for field in (
        "tasks",
        "attempts",
        "worker_kills",
        "redis_flushes",
        "lost",
        "duplicated",
        "stale",
    ):
        print(f"| {field} | {getattr(report, field)} |")
    print(f"| seconds | {report.seconds:.1f} |")
    return 0 if (report.lost, report.duplicated, report.stale) == (0, 0, 0) else 1


if __name__ == "__main__":
    sys.exit(main())
