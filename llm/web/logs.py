"""Structured logs: one JSON object per line through Python's ``logging``.

Events carry their fields as ``extra`` (``log.info("request", extra={"event": "request", "status": 200})``)
and ``JsonFormatter`` writes every extra field beside time, level, logger and message; a traceback becomes
the string field ``exc_info``. Lines are ASCII (``ensure_ascii``) so a prompt holding U+2028, NUL or a lone
surrogate can never split a line or break a log shipper. Prompts and answers are only logged when
``LLM_LOG_TRANSCRIPTS`` is on; that decision belongs to the code that logs them (``llm.web.observability``).
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import IO, Any

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
_HANDLER_MARK = "_llm_json_handler"


class JsonFormatter(logging.Formatter):
    """A record as one JSON line: time, level, logger, message, the ``extra`` fields, ``exc_info``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=True, default=str)


def configure_logging(settings: Any = None, stream: IO[str] | None = None, level: int | str | None = None
                      ) -> logging.Handler:
    """JSON lines on stderr (or ``stream``) for the root logger; calling it again replaces the handler.

    ``settings.log_level`` is used when the settings table has it; INFO otherwise. Werkzeug's own access
    lines are silenced below WARNING because the ``request`` event replaces them.
    """
    level = level or getattr(settings, "log_level", None) or logging.INFO
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    return handler
