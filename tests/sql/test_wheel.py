"""The wheel: `pip install ledgerq && ledgerq migrate` works outside this repository.

Builds the wheel from this checkout, installs it with its dependencies into a
fresh virtualenv (pip resolves them, from its cache when it can), and runs that
virtualenv's `ledgerq migrate` from a directory outside the repository, so only
the SQL shipped inside the wheel can be used.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from ledgerq import migrations

from .helpers import schema_snapshot

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    outside: Path  # a working directory outside the repository

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        # Nothing of the test run's environment may leak in: no PYTHONPATH,
        # no LEDGERQ_* settings, the fresh virtualenv first on PATH.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("LEDGERQ_", "PYTHON", "VIRTUAL_ENV"))
        }
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        return subprocess.run(
            args, cwd=self.outside, env=env, capture_output=True, text=True, timeout=120
        )


def run_checked(*args: str | Path, cwd: Path) -> None:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{' '.join(map(str, args))}:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    run_checked(sys.executable, "-m", "build", "--wheel", "--outdir", dist, REPO, cwd=root)
    (wheel,) = dist.glob("ledgerq-*.whl")
    venv = root / "venv"
    # No pip inside the new virtualenv: this run's pip installs into it
    # (--python), which saves the seconds ensurepip takes.
    run_checked(sys.executable, "-m", "venv", "--without-pip", venv, cwd=root)
    run_checked(
        sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install",
        "--quiet", "--disable-pip-version-check", wheel,
        cwd=root,
    )  # fmt: skip
    outside = root / "elsewhere"
    outside.mkdir()
    return Installed(wheel=wheel, venv=venv, outside=outside)


def test_wheel_ships_every_migration_and_function_file(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    for path in [*migrations.migration_files(), *migrations.function_files()]:
        assert f"ledgerq/sql/{path.parent.name}/{path.name}" in names
    assert "ledgerq/py.typed" in names


def test_installed_package_uses_its_own_sql_not_the_repositorys(installed: Installed) -> None:
    done = installed.run(
        "python", "-c", "from ledgerq import migrations; print(migrations.sql_dir())"
    )
    assert done.returncode == 0, done.stderr
    sql_dir = Path(done.stdout.strip())
    assert sql_dir.is_relative_to(installed.venv)
    assert not sql_dir.is_relative_to(REPO)


@pytest.mark.timeout(600)  # the first run may have to download the dependencies
def test_installed_ledgerq_migrate_creates_the_schema_from_outside_the_repository(
    installed: Installed, empty_db_url: str, db_url: str
) -> None:
    done = installed.run("ledgerq", "migrate", "--database-url", empty_db_url)

    assert done.returncode == 0, done.stderr
    for migration in migrations.migration_files():
        assert migration.stem in done.stdout
    assert f"functions re-applied ({len(migrations.function_files())} files)" in done.stdout
    # The same schema as the repository's own migrate makes (db_url's template).
    assert schema_snapshot(empty_db_url) == schema_snapshot(db_url)

    again = installed.run("ledgerq", "migrate", "--database-url", empty_db_url)
    assert again.returncode == 0, again.stderr
    assert "schema up to date" in again.stdout


def test_installed_ledgerq_migrate_fails_in_one_line_when_postgresql_is_unreachable(
    installed: Installed,
) -> None:
    done = installed.run(
        "ledgerq", "migrate", "--database-url", "postgresql://postgres@127.0.0.1:1/none"
    )
    assert done.returncode != 0
    assert done.stderr.startswith("ledgerq: ")
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr
