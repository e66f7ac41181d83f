"""The request target a prefix route relays, checked so it cannot leave its prefix.

A prefix route (``/sdapi/*: {pipeline, backend}``) sends the client's own path to
another HTTP backend. The path it sends is the *raw* request target the client wrote
(gunicorn's ``RAW_URI``), never Falcon's ``req.path``: that one is percent-decoded,
so ``/sdapi/..%2fmetrics`` would become ``/sdapi/../metrics``, and ``requests`` /
urllib3 then remove dot segments and re-encode, so what reached the backend was not
what the gateway routed.

:func:`check_relay_target` accepts a target only when it is unambiguous: under the
prefix, no segment that is ``.`` or ``..`` in any encoding (percent-encoded, either
case, double-encoded, with ``;`` parameters, full-width), no encoded ``/`` or ``\\``
inside a segment, no control character (NUL included) raw or encoded, no fragment,
and nothing ``requests``/urllib3 would rewrite (they decode ``%41`` to ``A``,
upper-case ``%c3`` to ``%C3``, drop an empty ``?``, encode ``|`` or ``[``).
So what goes upstream is byte for byte what the client sent.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Mapping
from urllib.parse import quote, unquote_to_bytes

from ..errors import InvalidRequestError

# RFC 3986: pchar = unreserved / pct-encoded / sub-delims / ":" / "@"
_UNRESERVED = r"A-Za-z0-9._~\-"
_SUB_DELIMS = "!$&'()*+,;="
_PATH_CHARS = re.compile(rf"(?:[{_UNRESERVED}{re.escape(_SUB_DELIMS)}:@/]|%[0-9A-F]{{2}})*")
_QUERY_CHARS = re.compile(rf"(?:[{_UNRESERVED}{re.escape(_SUB_DELIMS)}:@/?]|%[0-9A-F]{{2}})*")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_ABSOLUTE_FORM = re.compile(r"(?i)https?://[^/?#]*(/[^#]*)?")
# How many times a segment is percent-decoded to look for a hidden dot segment or
# slash (a backend, or a proxy behind it, may decode more than once).
_DECODE_DEPTH = 3
_FALLBACK_SAFE = _SUB_DELIMS + ":@/"


def _refuse(reason: str) -> InvalidRequestError:
    return InvalidRequestError(f"This path cannot be relayed: {reason}.")


def raw_target(environ: Mapping[str, object], path: str, query_string: str) -> str:
    """The request target as the client wrote it: gunicorn's ``RAW_URI`` (uWSGI's
    ``REQUEST_URI``); elsewhere ``path`` (decoded) quoted again. A query string the
    raw target does not carry (Falcon's test client keeps it apart) is appended."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if not isinstance(raw, str) or not raw:
        raw = quote(path, safe=_FALLBACK_SAFE)
    if "?" not in raw and query_string:
        raw += "?" + query_string
    return raw


def check_relay_target(target: str, prefix: str) -> str:
    """``target`` (a raw request target) when it may go to the prefix route's backend
    as it is: the path lies under ``prefix`` and nothing in it is ambiguous.

    Raises:
        InvalidRequestError: why not (400).
    """
    if not target.startswith("/"):
        absolute = _ABSOLUTE_FORM.fullmatch(target)
        if absolute is None or not absolute.group(1):
            raise _refuse("the request target must be a path")
        target = absolute.group(1)
    if "#" in target:
        raise _refuse("a fragment (#) is not sent to a server")
    path, has_query, query = target.partition("?")
    if not path.startswith(prefix + "/") or path == prefix + "/":
        raise _refuse(f"it is not under {prefix}/")
    for segment in path[len(prefix) + 1:].split("/"):
        _check_segment(segment)
    if not _PATH_CHARS.fullmatch(path):
        raise _refuse("the path holds characters that must be percent-encoded, or a malformed or "
                      "lower-case percent-escape (write %XX with upper-case hex digits)")
    if has_query and not query:
        raise _refuse("an empty query (a bare ?) is not relayed")
    if has_query and not _QUERY_CHARS.fullmatch(query):
        raise _refuse("the query holds characters that must be percent-encoded, or a malformed or "
                      "lower-case percent-escape (write %XX with upper-case hex digits)")
    for escape in _ESCAPE.findall(target):  # (control characters in the path: _check_segment)
        char = chr(int(escape, 16))
        if char == "\0":
            raise _refuse("it holds an encoded NUL")
        if re.fullmatch(f"[{_UNRESERVED}]", char):
            raise _refuse(f"%{escape} encodes {char!r}, which must be written as it is")
    _check_sent_as_is(target)
    return target


def _check_segment(segment: str) -> None:
    """Refuse a segment that is, or decodes to, a dot segment (``.``, ``..``, only dots
    and blanks, or one of those before a ``;`` parameter, also after NFKC: full-width
    dots), or that holds a ``/``, ``\\`` or control character once decoded, decoding
    up to ``_DECODE_DEPTH`` times."""
    if not segment.isascii():
        raise _refuse("the path holds characters that must be percent-encoded")
    data = segment.encode("ascii")
    for _ in range(_DECODE_DEPTH + 1):
        if b"/" in data or b"\\" in data:
            raise _refuse("a segment holds a backslash or an encoded slash")
        if any(byte < 0x20 or byte == 0x7F for byte in data):
            raise _refuse("a segment holds a control character")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise _refuse("a segment does not decode to UTF-8") from None
        for form in (text, unicodedata.normalize("NFKC", text)):
            if "/" in form or "\\" in form:
                raise _refuse("a segment holds an encoded slash or backslash")
            name = form.split(";", 1)[0]
            if name and not name.strip(". \t"):
                raise _refuse("a segment is . or .. (the path would leave its prefix)")
        if b"%" not in data:
            return
        data = unquote_to_bytes(data)


def _check_sent_as_is(target: str) -> None:
    """Refuse ``target`` unless ``requests`` and urllib3 send it unchanged (they remove
    dot segments, decode unreserved escapes, upper-case escapes, encode what RFC 3986
    does not allow, drop an empty query)."""
    import requests
    from urllib3.util.url import _encode_target

    base = "http://relay.invalid"
    prepared = requests.Request("GET", base + target).prepare()
    if prepared.url != base + target or _encode_target(prepared.path_url) != target:
        raise _refuse("it would not reach the backend as written")
