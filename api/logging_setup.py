"""Process-wide logging: plain lines by default, one JSON object per line with `--json-output`.

The JSON shape follows TGI's tracing subscriber closely enough for log pipelines keyed on it:
`timestamp` (RFC 3339, UTC), `level`, `message`, `target` (the logger name), plus `request_id` on
every line logged while serving an HTTP request (`tgserve.api.shared.request_id`).
"""
from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

from tgserve.api.shared.request_id import current_request_id

PLAIN_FORMAT = "%(asctime)s %(levelname)-5s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record; exceptions go into an `exception` field."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="microseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "message": record.getMessage(),
            "target": record.name,
        }
        request_id = current_request_id()
        if request_id is not None:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(json_output: bool, level: str = "INFO") -> None:
    """Send every logger (uvicorn's included) to stdout in the chosen format, replacing old handlers."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if json_output else logging.Formatter(PLAIN_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
