"""Log output: one line per record, untrusted text escaped, floods summarised.

`setup()` (called once by `discoveryd run`) installs one stderr handler on
the root logger with:

- a formatter: `text` (``time LEVEL logger: message``) or `json` (one JSON
  object per line). Both escape control characters in the rendered message
  and the exception text, so a file name, an etcd key or a NACK message that
  holds a newline (or an ANSI escape) can never forge or hide a log line.
  Traceback lines are kept, each indented, so no line of one ever starts
  like a record;
- a `RateLimiter` filter: at most `burst` records per (logger, level,
  message template) in each `window`; the rest are counted and replaced by
  one summary record when the window ends.

Records reach the handler from the event loop thread and, rarely, from
grpc's threads; the limiter takes a lock around its table.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import stat
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "JsonFormatter",
    "LogFormat",
    "RateLimiter",
    "TextFormatter",
    "escape",
    "insecure_permissions",
    "setup",
]


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


# C0 controls, DEL, C1 controls and the Unicode line/paragraph separators: every
# character a terminal, a log shipper or str.splitlines() may treat as a break or
# a control sequence.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(m: re.Match[str]) -> str:
    ch = m.group()
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """`text` with every control character written as a visible escape (``\\n``, ``\\x1b``, ``\\u2028``)."""
    return _UNSAFE.sub(_escape_char, text)


def _safe_message(record: logging.LogRecord) -> str:
    try:
        message = record.getMessage()
    except Exception as e:  # a bad format string or args must not lose the record
        message = f"{record.msg!r} % {record.args!r} (unformattable: {e})"
    return escape(message)


def _exception_lines(formatter: logging.Formatter, record: logging.LogRecord) -> list[str]:
    """Traceback and stack text, one escaped string per line.

    Frame chunks (``  File "...", line N, in f`` and the source lines below it) are
    split on their newlines; every other chunk (the exception's own message, which
    may quote untrusted text) stays one line with its newlines escaped.
    """
    lines: list[str] = []
    if record.exc_info and record.exc_info[1] is not None:
        for chunk in traceback.TracebackException.from_exception(record.exc_info[1]).format():
            body = chunk[:-1] if chunk.endswith("\n") else chunk
            if chunk.startswith('  File "'):
                lines.extend(escape(line) for line in body.split("\n"))
            else:
                lines.append(escape(body))
    if record.stack_info:
        lines.extend(escape(line) for line in formatter.formatStack(record.stack_info).split("\n"))
    return lines


class TextFormatter(logging.Formatter):
    """``2026-01-01 12:00:00,123 WARNING discoveryd.x: message``; traceback lines indented by four spaces."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = _safe_message(record)
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        extra = _exception_lines(self, record)
        return "\n".join([line, *("    " + ln for ln in extra)])


# Attributes every LogRecord has; anything else was passed with `extra=` and is a field.
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, template, fields from `extra=`, exception.

    `template` is the unformatted message, for grouping by kind of event.
    """

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": _safe_message(record),
            "template": escape(str(record.msg)),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and key not in out:
                out[key] = value if isinstance(value, int | float | bool) or value is None else escape(str(value))
        extra = _exception_lines(self, record)
        if extra:
            out["exception"] = "\n".join(extra)
        # ensure_ascii=False keeps names readable; json.dumps already escapes C0 controls,
        # the remaining separators are escaped by `escape` above.
        return json.dumps(out, ensure_ascii=False)


@dataclass(slots=True)
class _Bucket:
    window_start: float
    passed: int
    suppressed: int
    level: int
    logger: str
    template: str
    last: logging.LogRecord | None = None
    """The last record suppressed, rendered (clipped) in the summary."""


_SAMPLE_CHARS = 300


class RateLimiter(logging.Filter):
    """Pass at most `burst` records per (logger, level, template) per `window` seconds; summarise the rest.

    The table holds at most `max_keys` entries (a template built with an
    f-string would otherwise make one per message); past that, the oldest
    windows are summarised and dropped. A summary goes out when a record of
    the same key arrives after its window, at the end of the window if the
    filter runs on an event loop (a `call_later`, no task), or on `flush()`.
    Summary records carry `suppressed` and are never limited themselves.
    """

    def __init__(
        self,
        burst: int = 10,
        window: float = 10.0,
        max_keys: int = 1024,
        clock: Any = time.monotonic,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.window = window
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: dict[tuple[str, int, str], _Bucket] = {}
        self._lock = threading.Lock()
        self._sink: logging.Handler | None = None

    def attach(self, handler: logging.Handler) -> None:
        """Send summaries to `handler` (the one this filter is added to)."""
        self._sink = handler

    def filter(self, record: logging.LogRecord) -> bool:
        # Summaries, and records whose producer applies its own rate limit (the DNS query log).
        if hasattr(record, "suppressed") or getattr(record, "prelimited", False):
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        due: list[_Bucket] = []
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is not None and now - bucket.window_start >= self.window:
                if bucket.suppressed:
                    due.append(dataclasses.replace(bucket))
                bucket = None
            if bucket is None:
                if len(self._buckets) >= self.max_keys:
                    due.extend(self._evict_locked(now))
                bucket = _Bucket(now, 0, 0, record.levelno, record.name, str(record.msg))
                self._buckets[key] = bucket
            if bucket.passed < self.burst:
                bucket.passed += 1
                allow = True
            else:
                first_suppressed = bucket.suppressed == 0
                bucket.suppressed += 1
                bucket.last = record
                allow = False
        for b in due:
            self._emit_summary(b, now)
        if not allow and first_suppressed:
            self._schedule(bucket.window_start + self.window - now)
        return allow

    def _evict_locked(self, now: float) -> list[_Bucket]:
        """Drop the older half of the table; the dropped windows that suppressed anything are returned."""
        oldest = sorted(self._buckets.items(), key=lambda kv: kv[1].window_start)[: max(1, len(self._buckets) // 2)]
        for key, _ in oldest:
            del self._buckets[key]
        return [b for _, b in oldest if b.suppressed]

    def _schedule(self, delay: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not on the event loop thread: the summary goes out lazily or on flush()
        loop.call_later(max(delay, 0.0), self.flush)

    def flush(self) -> None:
        """Emit the summary of every window that has ended (every window, at shutdown: see `close`)."""
        self._flush(final=False)

    def close(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        now = self._clock()
        due: list[_Bucket] = []
        with self._lock:
            for key, bucket in list(self._buckets.items()):
                if final or now - bucket.window_start >= self.window:
                    if bucket.suppressed:
                        due.append(dataclasses.replace(bucket))
                    del self._buckets[key]
        for b in due:
            self._emit_summary(b, now)

    def _emit_summary(self, bucket: _Bucket, now: float) -> None:
        if self._sink is None:
            return
        record = logging.LogRecord(
            bucket.logger,
            bucket.level,
            __file__,
            0,
            "%d more messages like %r suppressed in the last %.0fs (last: %s)",
            (bucket.suppressed, bucket.template, max(now - bucket.window_start, 0.0), _sample(bucket.last)),
            None,
        )
        record.suppressed = bucket.suppressed
        record.template_suppressed = bucket.template
        self._sink.handle(record)


def _sample(record: logging.LogRecord | None) -> str:
    if record is None:
        return "-"
    try:
        text = record.getMessage()
    except Exception:
        text = str(record.msg)
    return text if len(text) <= _SAMPLE_CHARS else text[:_SAMPLE_CHARS] + "..."


class _Handler(logging.StreamHandler[TextIO]):
    """stderr handler that flushes its limiter's pending summaries when closed (logging.shutdown)."""

    def __init__(self, stream: TextIO, limiter: RateLimiter) -> None:
        super().__init__(stream)
        self.limiter = limiter

    def close(self) -> None:
        self.limiter.close()
        super().close()


def setup(
    level: int | str,
    fmt: LogFormat = LogFormat.TEXT,
    stream: TextIO | None = None,
    limiter: RateLimiter | None = None,
) -> logging.Handler:
    """Replace the root logger's handlers with one escaped, rate-limited stream handler; return it."""
    limiter = limiter or RateLimiter()
    handler = _Handler(stream if stream is not None else sys.stderr, limiter)
    handler.setFormatter(JsonFormatter() if fmt is LogFormat.JSON else TextFormatter())
    handler.addFilter(limiter)
    limiter.attach(handler)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    # watchfiles logs every batch of changes at INFO: noise, and a feedback loop when
    # the log file lies in a watched directory.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    return handler


def insecure_permissions(path: Path) -> list[str]:
    """Why `path` (a config file) can be changed by users other than its owner; empty when it cannot.

    Checks the file (writable by group or others) and its directory (writable by
    group or others without the sticky bit: the file can be replaced).
    """
    problems: list[str] = []
    try:
        st = os.stat(path)
    except OSError:
        return problems
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = " and ".join(w for bit, w in ((stat.S_IWGRP, "group"), (stat.S_IWOTH, "others")) if st.st_mode & bit)
        problems.append(f"{path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})")
    parent = path.parent
    try:
        pst = os.stat(parent)
    except OSError:
        return problems
    if pst.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not pst.st_mode & stat.S_ISVTX:
        who = " and ".join(w for bit, w in ((stat.S_IWGRP, "group"), (stat.S_IWOTH, "others")) if pst.st_mode & bit)
        problems.append(
            f"{parent} is writable by {who} (mode {stat.S_IMODE(pst.st_mode):04o}): the config file can be replaced"
        )
    return problems
