"""Text made safe to show: control characters escaped, secrets redacted.

Task types, queues, idempotency keys and errors come from clients and
handlers. Printed raw, ``\\x1b]52;c;...\\x07`` writes a terminal's clipboard,
``\\x1b[2J`` clears it, and a carriage return or bidi override can forge a line
of output; pipes do not help (click strips only colour sequences). So every
line the command line prints from the ledger goes through ``printable``.

Database and Redis URLs carry passwords (``user:pw@host``, ``?password=``,
``password=pw`` in a key=value DSN): every message that may hold one goes
through ``redact``.
"""

from __future__ import annotations

import re

# C0 controls, DEL, C1 controls, and the Unicode format characters that reorder
# or hide text (bidi embeddings, overrides and isolates; zero-width marks; the
# line and paragraph separators).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

# scheme://user:password@ → scheme://user:***@ (the user stays: it helps, and is no secret).
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):([^@\s]*)@")
# password=... as a URL query parameter or in a key=value DSN, quoted or not.
_PASSWORD_PARAMETER = re.compile(
    r"(?i)\b(password|passwd|pwd|sslpassword)(\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&;'\"]+)"
)


def printable(text: str) -> str:
    """text with every control or hiding character escaped (``\\x1b``, ``\\u202e``)."""
    return _UNPRINTABLE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _ESCAPES:
        return _ESCAPES[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def redact(text: str) -> str:
    """text with every password in a URL or DSN replaced by ***."""
    text = _URL_PASSWORD.sub(r"\1:***@", text)
    return _PASSWORD_PARAMETER.sub(r"\1\2***", text)


def line(text: str) -> str:
    """A message for a terminal or a log: secrets redacted, controls escaped."""
    return printable(redact(text))
