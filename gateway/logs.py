"""Logging set-up: the level from ``LLAMAGATE_LOG_LEVEL``, and bounded log lines.

``LLAMAGATE_LOG_LEVEL`` takes ``debug``, ``info``, ``warning``, ``error`` or
``critical`` in any case (gunicorn takes them in lower case, Python's logging in
upper case). ``llamagate serve``/``up`` and gunicorn's config refuse any other value
with one line on stderr before a worker starts.

Every record of the ``llamagate`` logger (and, once :func:`setup_logging` ran, of
every logger writing through the root handlers) passes :class:`BoundedRecords`: the
message is cut to ``MESSAGE_CHARS``, a traceback's lines to ``TRACEBACK_LINE_CHARS``
and the whole traceback to ``TRACEBACK_CHARS``, and URLs lose their userinfo. Log
lines carry client-controlled text (paths, model names, exception messages that
echo a request's values): a client must not be able to write megabytes per request.

It imports only the standard library: gunicorn's master imports it.
"""

from __future__ import annotations

import logging
import os
import traceback

from .redact import clip, redact_url

LEVEL_ENV = "LLAMAGATE_LOG_LEVEL"
LEVELS = ("debug", "info", "warning", "error", "critical")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MESSAGE_CHARS = 8192
TRACEBACK_CHARS = 8192
TRACEBACK_LINE_CHARS = 1024


def log_level(value: str | None) -> str:
    """The level name (upper case) for a ``LLAMAGATE_LOG_LEVEL`` value, in any case;
    None or empty means ``INFO``.

    Raises:
        ValueError: a value that names no level, with a message fit for the operator.
    """
    name = (value or "info").strip().lower()
    if name not in LEVELS:
        raise ValueError(f"{LEVEL_ENV}={value!r} is not a log level; use one of {', '.join(LEVELS)} (any case)")
    return name.upper()


def env_log_level() -> str:
    """:func:`log_level` of ``LLAMAGATE_LOG_LEVEL``."""
    return log_level(os.environ.get(LEVEL_ENV))


class BoundedRecords(logging.Filter):
    """Cuts a record's message and traceback to a bounded size and redacts URL
    userinfo in both; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_llamagate_bounded", False):
            return True
        record._llamagate_bounded = True
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let the handler report it as usual
            return True
        record.msg, record.args = clip(redact_url(message), MESSAGE_CHARS), None
        if record.exc_info and not record.exc_text:
            text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            lines = [clip(line, TRACEBACK_LINE_CHARS) for line in redact_url(text).split("\n")]
            text = "\n".join(lines)
            if len(text) > TRACEBACK_CHARS:  # keep the top and the exception line(s) at the bottom
                half = TRACEBACK_CHARS // 2
                text = f"{text[:half]}\n…[{len(text) - 2 * half} chars left out]…\n{text[-half:]}"
            record.exc_text = text
        return True


_BOUNDS = BoundedRecords()


def bound_logger(logger: logging.Logger | logging.Handler) -> None:
    """Add the bounds to a logger or handler (once)."""
    if _BOUNDS not in logger.filters:
        logger.addFilter(_BOUNDS)


def setup_logging() -> None:
    """What a worker runs first: the root logger at ``LLAMAGATE_LOG_LEVEL`` (``INFO``,
    with a warning, when the value names no level: gunicorn's config already refused
    it when the gateway runs under it), every handler of it bounded."""
    try:
        level, problem = env_log_level(), None
    except ValueError as exc:
        level, problem = "INFO", str(exc)
    logging.basicConfig(level=level, format=FORMAT)
    for handler in logging.getLogger().handlers:
        bound_logger(handler)
    if problem:
        logging.getLogger("llamagate").warning("%s; logging at INFO", problem)


bound_logger(logging.getLogger("llamagate"))
