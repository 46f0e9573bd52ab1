"""JSON logs: one line per request on the `gateway.access` logger, plus ordinary events."""

from __future__ import annotations

import logging
import sys
import time

import orjson


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        else:
            line["msg"] = record.getMessage()
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # our access line replaces uvicorn's; its errors still come through the root handler
    logging.getLogger("uvicorn.access").disabled = True
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


access_log = logging.getLogger("gateway.access")
_ts_cache = [0, ""]  # (second, its formatted timestamp prefix)


def _now() -> str:
    t = time.time()
    sec = int(t)
    if sec != _ts_cache[0]:
        _ts_cache[:] = [sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))]
    return f"{_ts_cache[1]}.{int((t - sec) * 1000):03d}Z"


def log_request(fields: dict) -> None:
    """The access line, in the same JSON as every other line. Written straight to the
    handler's stream, not through the logging machinery: that costs more CPU than the rest of
    the request's bookkeeping, once per request."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    handlers = logging.getLogger().handlers
    if len(handlers) != 1 or not isinstance(handlers[0].formatter, JsonFormatter):
        access_log.info("", extra={"fields": fields})  # not set up by setup_logging
        return
    line = {"ts": _now(), "level": "info", "logger": access_log.name}
    line.update(fields)
    handler = handlers[0]
    with handler.lock:
        handler.stream.write(orjson.dumps(line).decode() + "\n")
        handler.stream.flush()
