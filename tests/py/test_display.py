"""display.printable and display.redact: what the command line and the logs may show."""

from __future__ import annotations

import pytest

from ledgerq import config, display, errors


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("email.send", "email.send"),
        ("\x1b]0;TITLE\x07", "\\x1b]0;TITLE\\x07"),
        ("\x1b]52;c;ZXZpbA==\x07", "\\x1b]52;c;ZXZpbA==\\x07"),
        ("a\x1b[2Jb", "a\\x1b[2Jb"),
        ("ok\rFORGED", "ok\\rFORGED"),
        ("line\nnext", "line\\nnext"),
        ("\x9b31m", "\\x9b31m"),
        ("abc\u202edcba", "abc\\u202edcba"),
        ("zero\u200bwidth", "zero\\u200bwidth"),
        ("café ✓", "café ✓"),
    ],
)
def test_printable_escapes_every_control_and_hiding_character(raw: str, shown: str) -> None:
    assert display.printable(raw) == shown


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("postgresql://alice:s3cret@db:5432/x", "postgresql://alice:***@db:5432/x"),
        ("postgres+psycopg://alice:pw@db/x", "postgres+psycopg://alice:***@db/x"),
        (
            "postgresql://db/x?sslmode=require&password=pw",
            "postgresql://db/x?sslmode=require&password=***",
        ),
        ("host=db user=alice password=s3cret dbname=x", "host=db user=alice password=*** dbname=x"),
        ("host=db password='s3 cret' dbname=x", "host=db password=*** dbname=x"),
        ("redis://:tok@cache:6379/0", "redis://:***@cache:6379/0"),
        ("rediss://default:tok@cache/0 and more", "rediss://default:***@cache/0 and more"),
        ("postgresql://alice@db/x", "postgresql://alice@db/x"),
    ],
)
def test_redact_hides_passwords_in_urls_and_dsns(raw: str, shown: str) -> None:
    assert display.redact(raw) == shown


@pytest.mark.parametrize(
    ("database_url", "redis_url"),
    [
        ("postgres+psycopg://alice:pw-secret@db/x", "redis://127.0.0.1/0"),
        ("host=db user=alice password=pw-secret", "redis://127.0.0.1/0"),
        ("postgresql://db/x", "http://user:pw-secret@cache/0"),
    ],
)
def test_configuration_errors_never_echo_a_password(database_url: str, redis_url: str) -> None:
    with pytest.raises(errors.ConfigError) as info:
        config.Settings(database_url=database_url, redis_url=redis_url)
    assert "pw-secret" not in str(info.value)
    assert "***" in str(info.value)


def test_the_redacted_database_url_hides_a_password_parameter() -> None:
    settings = config.Settings(database_url="postgresql://db/x?password=pw-secret&sslmode=disable")
    assert settings.redacted_database_url() == "postgresql://db/x?password=***&sslmode=disable"
