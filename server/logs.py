"""Logging set-up: JSON lines (or text on a terminal), each record carrying its RPC's request context."""

from __future__ import annotations

import logging
import sys
import uuid
from contextvars import ContextVar
from dataclasses import dataclass
from typing import IO, Any, Literal

from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["auto", "json", "text"]

#: Metadata key of the caller's request id; the server returns the id it used under the same key.
REQUEST_ID_HEADER = "x-request-id"
PARTNER_HEADER = "partner-id"
MAX_HEADER_CHARS = 128
#: Logged instead of a partner-id header that is too long or not printable (it is attacker-chosen).
INVALID_PARTNER = "<invalid>"
#: Request-context attributes the filter puts on every record logged while an RPC is being served.
CONTEXT_FIELDS = ("request_id", "method", "partner")


@dataclass(frozen=True, slots=True)
class RequestContext:
    request_id: str
    method: str
    partner: str | None


#: Set for the duration of each RPC (its task, and the executor thread it hands work to).
current_request: ContextVar[RequestContext | None] = ContextVar("keybinder_request", default=None)


def clean_header(value: object) -> str | None:
    """``value`` when it is a short printable ASCII string, else None: safe to log and to echo back."""
    if isinstance(value, str) and 0 < len(value) <= MAX_HEADER_CHARS and value.isascii() and value.isprintable():
        return value
    return None


def new_request_id() -> str:
    return str(uuid.uuid4())


class RequestContextFilter(logging.Filter):
    """Copies the current RPC's request id, method and partner onto each record (unless it has its own)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = current_request.get()
        if ctx is not None and not hasattr(record, "request_id"):
            record.request_id = ctx.request_id
            record.method = ctx.method
            record.partner = ctx.partner
        return True


class TextFormatter(logging.Formatter):
    """The classic one-line format, with the request context appended as key=value for humans."""

    SUFFIX_FIELDS = ("request_id", "partner", "cause")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [f"{k}={v}" for k in self.SUFFIX_FIELDS if (v := getattr(record, k, None)) is not None]
        if not extras:
            return line
        head, sep, tail = line.partition("\n")  # keep a traceback below the first line
        return f"{head} [{' '.join(extras)}]{sep}{tail}"


def use_json(log_format: LogFormat, stream: IO[str]) -> bool:
    """``auto`` means JSON unless the stream is a terminal (a person is reading it)."""
    if log_format == "auto":
        isatty = getattr(stream, "isatty", None)
        return not (callable(isatty) and isatty())
    return log_format == "json"


def make_handler(log_format: LogFormat, stream: IO[str], *, worker: int | None = None) -> logging.Handler:
    """A stream handler in the chosen format that adds the request context to every record."""
    handler = logging.StreamHandler(stream)
    formatter: logging.Formatter
    if use_json(log_format, stream):
        static: dict[str, Any] = {} if worker is None else {"worker": worker}
        formatter = JsonFormatter(
            "%(levelname)s %(name)s %(process)d %(message)s",
            rename_fields={"levelname": "level", "name": "logger", "process": "pid"},
            static_fields=static,
            timestamp="time",
        )
    else:
        who = "" if worker is None else f" worker-{worker}"
        formatter = TextFormatter(f"%(asctime)s %(levelname)s{who} %(name)s %(message)s")
    handler.setFormatter(formatter)
    handler.addFilter(RequestContextFilter())
    return handler


def configure_logging(
    level: str, log_format: LogFormat, *, worker: int | None = None, stream: IO[str] | None = None
) -> None:
    """Set up the root logger once per process (a no-op when it already has handlers, like basicConfig)."""
    handler = make_handler(log_format, stream or sys.stderr, worker=worker)
    logging.basicConfig(level=level.upper(), handlers=[handler])
    logging.getLogger("yoyo").setLevel(logging.WARNING)


#: grpcio's Cython layer logs a header value it cannot decode as UTF-8, raw, at ERROR with a traceback
#: (grpc_string.pyx.pxi: ``_LOGGER.exception('Invalid encoding on %s', value)``): a partner-api-key with one
#: bad byte would put the key in the log.
GRPC_CYTHON_LOGGER = "grpc._cython.cygrpc"
_GRPC_UNDECODABLE = "Invalid encoding on %s"


class GrpcSecretFilter(logging.Filter):
    """Keeps request bytes grpcio logs out of every log: the undecodable-header record becomes one WARNING
    without the value or traceback; any other bytes argument of grpcio's is replaced by its length."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == _GRPC_UNDECODABLE:
            record.msg = "a request header value is not valid UTF-8 (read as Latin-1; value not logged)"
            record.args = ()
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        elif isinstance(record.args, tuple) and any(isinstance(a, bytes | bytearray) for a in record.args):
            record.args = tuple(f"<{len(a)} bytes>" if isinstance(a, bytes | bytearray) else a for a in record.args)
        return True


def filter_grpc_logs() -> None:
    """Install GrpcSecretFilter on grpcio's loggers (idempotent)."""
    for name in (GRPC_CYTHON_LOGGER, "grpc", "grpc.aio", "grpc._server"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, GrpcSecretFilter) for f in logger.filters):
            logger.addFilter(GrpcSecretFilter())
