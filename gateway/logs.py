"""Logging set-up: the level from the settings (``LLAMAGATE_LOG_LEVEL``), and bounded
log lines.

``LLAMAGATE_LOG_LEVEL`` takes ``debug``, ``info``, ``warning``, ``error`` or
``critical`` in any case (``gateway.settings`` reads and checks it: gunicorn's config
and the ``llamagate`` commands refuse any other value with one line on stderr before a
worker starts).

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
import traceback

from . import settings
from .redact import clip, redact_url

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MESSAGE_CHARS = 8192
TRACEBACK_CHARS = 8192
TRACEBACK_LINE_CHARS = 1024


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


def setup_logging(level: str | None = None) -> None:
    """What a worker runs first: the root logger at ``level`` (a level name in any case;
    default the settings' ``log_level``), every handler of it bounded.

    Raises:
        ValueError: ``level`` names no level.
        settings.SettingsError: ``level`` not given and the environment has bad settings
            (under gunicorn, its config refused them before any worker started).
    """
    name = (level or settings.current().log_level).strip().lower()
    if name not in settings.LOG_LEVELS:
        raise ValueError(f"{level!r} is not one of {', '.join(settings.LOG_LEVELS)} (any case)")
    logging.basicConfig(level=name.upper(), format=FORMAT)
    for handler in logging.getLogger().handlers:
        bound_logger(handler)


bound_logger(logging.getLogger("llamagate"))
