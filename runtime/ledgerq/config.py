"""Settings from ``LEDGERQ_*`` environment variables and command options.

Validated once, at start-up, so a typo fails loudly before any work is taken.

=======================  ==============================================  =========================
variable                 default                                         meaning
=======================  ==============================================  =========================
LEDGERQ_DATABASE_URL     postgresql://postgres@127.0.0.1:5432/postgres   the ledger
LEDGERQ_REDIS_URL        redis://127.0.0.1:6379/0                        the dispatcher
LEDGERQ_REDIS_CLUSTER    unset                                           1/true: Redis Cluster
LEDGERQ_REDIS_PREFIX     ledgerq                                         prefix of every Redis key
LEDGERQ_API_TOKEN        unset                                           bearer token for the API
LEDGERQ_API_READONLY_TOKEN unset                                         read-only bearer token
=======================  ==============================================  =========================

``redis+cluster://host:port`` is the same as a plain URL with the cluster flag.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from urllib.parse import urlsplit

from ledgerq import display, errors

DATABASE_URL_DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL_DEFAULT = "redis://127.0.0.1:6379/0"
REDIS_PREFIX_DEFAULT = "ledgerq"

_PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_TRUE = {"1", "true", "yes", "on"}


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """Where the ledger and the dispatcher are, and how to reach them."""

    database_url: str = DATABASE_URL_DEFAULT
    redis_url: str = REDIS_URL_DEFAULT
    redis_prefix: str = REDIS_PREFIX_DEFAULT
    redis_cluster: bool = False
    api_token: str | None = None
    #: Reads everything the admin token reads; every changing route answers 403.
    api_readonly_token: str | None = None

    def __post_init__(self) -> None:
        db_scheme = urlsplit(self.database_url).scheme
        if db_scheme not in ("postgres", "postgresql"):
            raise errors.ConfigError(
                f"database URL must start with postgresql://, got {display.redact(self.database_url)!r}"
            )
        redis_scheme = urlsplit(self.redis_url).scheme
        if redis_scheme not in ("redis", "rediss", "redis+cluster", "unix"):
            raise errors.ConfigError(
                f"Redis URL must start with redis://, rediss:// or redis+cluster://, "
                f"got {display.redact(self.redis_url)!r}"
            )
        if redis_scheme == "redis+cluster":
            object.__setattr__(self, "redis_cluster", True)
            object.__setattr__(self, "redis_url", "redis" + self.redis_url[len("redis+cluster") :])
        if not _PREFIX_PATTERN.match(self.redis_prefix):
            raise errors.ConfigError(
                "Redis prefix must be 1-64 characters of letters, digits and _.:-, "
                f"got {self.redis_prefix!r}"
            )
        if self.api_token is not None and len(self.api_token) < 8:
            raise errors.ConfigError("API token must be at least 8 characters")
        if self.api_readonly_token is not None:
            if self.api_token is None:
                # Without an admin token the API is open to everyone, so a
                # read-only token would restrict nobody: refuse the illusion.
                raise errors.ConfigError(
                    "a read-only API token needs an admin API token (LEDGERQ_API_TOKEN) too"
                )
            if len(self.api_readonly_token) < 8:
                raise errors.ConfigError("read-only API token must be at least 8 characters")
            if self.api_readonly_token == self.api_token:
                raise errors.ConfigError("the read-only API token must differ from the admin token")

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        database_url: str | None = None,
        redis_url: str | None = None,
        redis_prefix: str | None = None,
        redis_cluster: bool | None = None,
        api_token: str | None = None,
        api_readonly_token: str | None = None,
    ) -> Settings:
        """Settings from the environment; explicit arguments (command options) win."""
        env = os.environ if env is None else env
        cluster_env = env.get("LEDGERQ_REDIS_CLUSTER", "").strip().lower() in _TRUE
        return cls(
            database_url=database_url or env.get("LEDGERQ_DATABASE_URL") or DATABASE_URL_DEFAULT,
            redis_url=redis_url or env.get("LEDGERQ_REDIS_URL") or REDIS_URL_DEFAULT,
            redis_prefix=redis_prefix or env.get("LEDGERQ_REDIS_PREFIX") or REDIS_PREFIX_DEFAULT,
            redis_cluster=cluster_env if redis_cluster is None else redis_cluster,
            api_token=api_token or env.get("LEDGERQ_API_TOKEN") or None,
            api_readonly_token=api_readonly_token or env.get("LEDGERQ_API_READONLY_TOKEN") or None,
        )

    def redacted_database_url(self) -> str:
        """The database URL without its password, for messages and logs."""
        return display.redact(self.database_url)
