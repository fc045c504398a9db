"""Credentials never reach a log line: a logging filter that masks them wherever they appear.

Credentials come only from the environment or the standard AWS configuration (see ttd/store/uri.py); ttd never writes
them anywhere. Libraries may: botocore's debug log prints signed request headers (`Credential=AKIA.../...`), so the
CLI's log handler masks the values of credential variables and the signature fields of AWS request headers.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable

SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
               "PREFECT_API_KEY", "RAY_AUTH_TOKEN")
MASK = "***"
_AWS_FIELDS = re.compile(r"(Credential=|Signature=|X-Amz-Credential=|X-Amz-Signature=|X-Amz-Security-Token=)"
                         r"[^,&\s'\"]+")
_AUTH_HEADER = re.compile(r"((?:'|\")?(?:Authorization|X-Amz-Security-Token)(?:'|\")?\s*[:=]\s*b?(?:'|\"))"
                          r"[^'\"]+", re.IGNORECASE)


def secret_values() -> list[str]:
    """The credential values in this process's environment (short ones are not masked: too many false hits)."""
    return sorted({v for k in SECRET_VARS if len(v := os.environ.get(k, "")) >= 8}, key=len, reverse=True)


def redact(text: str) -> str:
    for value in secret_values():
        text = text.replace(value, MASK)
    text = _AUTH_HEADER.sub(lambda m: m.group(1) + MASK, text)
    return _AWS_FIELDS.sub(lambda m: m.group(1) + MASK, text)


class RedactingFilter(logging.Filter):
    """Formats the record's message once, masked; arguments are dropped so no handler formats them again."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


class RedactingFormatter(logging.Formatter):
    """Masks what another formatter writes: handlers whose format adds record fields to the message (Prefect's
    console handler prints the flow run's name before it)."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record))


def mask_handlers(*loggers: logging.Logger) -> list[Callable[[], None]]:
    """Mask credentials in every handler of these loggers (another library's too, e.g. Prefect's console and API
    handlers): the masking filter on the record, and a masking formatter around the handler's own. Returns one
    undo per change, so a caller can take them off again."""
    undo: list[Callable[[], None]] = []
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                masking = RedactingFilter()
                handler.addFilter(masking)
                undo.append(lambda h=handler, f=masking: h.removeFilter(f))
            if not isinstance(handler.formatter, RedactingFormatter):
                old = handler.formatter
                handler.setFormatter(RedactingFormatter(old))
                undo.append(lambda h=handler, f=old: h.setFormatter(f))
    return undo
