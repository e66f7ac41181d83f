"""Keeping secrets and floods out of what the gateway shows and logs.

* :func:`redact_url`: a URL's userinfo (``http://user:secret@host``) becomes ``***``,
  wherever a replica URL is shown (``/health``, ``/admin/status``, log lines, the
  command line's ``check``, ``routes`` and ``status``);
* :func:`clip`: a client-controlled string cut to a bounded length, with a marker
  saying how much was left out;
* :func:`clip_json`: a JSON value (a logged request body) kept whole when it is
  small, else its compact JSON text, clipped;
* :func:`key_hint`: enough of an API key to recognise it, never the key.

It imports only the standard library: gunicorn's master imports it.
"""

from __future__ import annotations

import json
import re
from typing import Any

# scheme://userinfo@ : the userinfo runs to the last "@" before the host's end.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s@]*(?:@[^/?#\s@]*)*@")
FIELD_CHARS = 256


def redact_url(text: str) -> str:
    """``text`` (a URL, or any text holding URLs) with each URL's userinfo replaced
    by ``***``: ``http://user:s3cret@host:8081/x`` -> ``http://***@host:8081/x``."""
    return _USERINFO.sub(r"\1***@", text)


def clip(text: str, limit: int = FIELD_CHARS) -> str:
    """``text`` cut to at most about ``limit`` characters, ending in
    ``…[+N chars]`` when something was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…[+{len(text) - limit} chars]"


def clip_json(value: Any, limit: int) -> Any:
    """``value`` itself when its compact JSON has at most ``limit`` characters, else
    that JSON text clipped (a string)."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return clip(value, limit)
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    return value if len(text) <= limit else clip(text, limit)


def key_hint(key: str) -> str:
    """A key shown without giving it away: its first 6 characters and ``…`` (only
    ``…`` for a key too short to spare any)."""
    return key[:6] + "…" if len(key) >= 20 else "…"
