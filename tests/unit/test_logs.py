"""Log lines: untrusted text escaped, JSON output, flood summaries, config permission warnings."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from discoveryd import logs
from discoveryd.logs import JsonFormatter, LogFormat, RateLimiter, TextFormatter
from tests.helpers import eventually

FORGED = "x.yaml\n2026-11-30 04:00:00,000 CRITICAL discoveryd: disk on fire"
RECORD_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ")


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain/path.yaml", "plain/path.yaml"),
        ("a\nb", "a\\nb"),
        ("a\r\nb", "a\\r\\nb"),
        ("tab\there", "tab\\there"),
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
        ("nul\x00", "nul\\x00"),
        ("del\x7f", "del\\x7f"),
        ("c1\x85next", "c1\\x85next"),
        ("ls\u2028ps\u2029", "ls\\u2028ps\\u2029"),
        ("café ünïcode", "café ünïcode"),
    ],
)
def test_escape_makes_every_control_character_visible(raw: str, shown: str) -> None:
    assert logs.escape(raw) == shown
    assert len(logs.escape(raw).splitlines()) <= 1


def _logger(fmt: logging.Formatter, name: str = "discoveryd.test") -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(fmt)
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


@pytest.fixture
def text() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    logger, stream = _logger(TextFormatter())
    yield logger, stream
    logger.handlers.clear()


def test_a_newline_in_an_argument_cannot_forge_a_record(text: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = text
    logger.warning("%s: invalid YAML", FORGED)
    out = stream.getvalue()
    lines = out.splitlines()
    assert len(lines) == 1
    assert RECORD_LINE.match(lines[0])
    assert "x.yaml\\n2026-11-30 04:00:00,000 CRITICAL" in lines[0]


def test_a_newline_in_the_message_itself_is_escaped(text: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = text
    logger.error(FORGED)  # an f-string-built message has no args: the message is escaped too
    assert len(stream.getvalue().splitlines()) == 1


def test_traceback_lines_are_indented_and_escaped(text: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = text
    try:
        raise ValueError(FORGED)
    except ValueError:
        logger.exception("registry crashed")
    lines = stream.getvalue().splitlines()
    assert RECORD_LINE.match(lines[0])
    assert len(lines) > 2
    for line in lines[1:]:
        assert line.startswith("    "), line
        assert not RECORD_LINE.match(line)
    assert any("x.yaml\\n2026" in line for line in lines)


def test_json_lines_carry_the_escaped_message_template_and_extra_fields() -> None:
    logger, stream = _logger(JsonFormatter(), "discoveryd.jsontest")
    logger.warning("%s: skipped", FORGED + "\u2028", extra={"registry": "etcd/main", "count": 3})
    try:
        raise RuntimeError("boom\nCRITICAL")
    except RuntimeError:
        logger.exception("failed")
    logger.handlers.clear()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["level"] == "WARNING"
    assert first["logger"] == "discoveryd.jsontest"
    assert first["template"] == "%s: skipped"
    assert first["message"].startswith("x.yaml\\n2026-11-30")
    assert first["message"].endswith("\\u2028: skipped")
    assert first["registry"] == "etcd/main"
    assert first["count"] == 3
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert "RuntimeError: boom\\nCRITICAL" in second["exception"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def limited() -> Iterator[tuple[logging.Logger, io.StringIO, FakeClock, logging.Handler]]:
    clock = FakeClock()
    limiter = RateLimiter(burst=10, window=10.0, max_keys=8, clock=clock)
    stream = io.StringIO()
    handler = logs.setup(logging.INFO, LogFormat.TEXT, stream=stream, limiter=limiter)
    logger = logging.getLogger("discoveryd.flood")
    yield logger, stream, clock, handler
    logging.getLogger().removeHandler(handler)


def test_ten_thousand_bad_files_give_ten_lines_and_one_summary(
    limited: tuple[logging.Logger, io.StringIO, FakeClock, logging.Handler],
) -> None:
    logger, stream, clock, _ = limited
    for i in range(10_000):
        logger.warning("%s:1: invalid YAML", f"bad-{i}.yaml")
    assert len(stream.getvalue().splitlines()) == 10
    clock.now += 10.0
    logger.warning("%s:1: invalid YAML", "late.yaml")  # the next window: passes, and closes the last one
    lines = stream.getvalue().splitlines()
    assert len(lines) == 12
    assert "9990 more messages like '%s:1: invalid YAML' suppressed in the last 10s" in lines[10]
    assert lines[10].endswith("(last: bad-9999.yaml:1: invalid YAML)")
    assert "late.yaml" in lines[11]


def test_templates_and_levels_are_limited_separately(
    limited: tuple[logging.Logger, io.StringIO, FakeClock, logging.Handler],
) -> None:
    logger, stream, _, _ = limited
    for i in range(30):
        logger.warning("a %d", i)
        logger.error("a %d", i)
        logger.warning("b %d", i)
    assert len(stream.getvalue().splitlines()) == 30


def test_the_table_stays_bounded_and_summaries_are_not_lost(
    limited: tuple[logging.Logger, io.StringIO, FakeClock, logging.Handler],
) -> None:
    logger, stream, clock, handler = limited
    limiter = next(f for f in handler.filters if isinstance(f, RateLimiter))
    for _ in range(12):
        logger.warning("first flood")
    for i in range(1000):  # a template per message (an f-string): each a key of its own
        clock.now += 0.001
        logger.warning(f"distinct {i}")
    assert len(limiter._buckets) <= 8
    assert "2 more messages like 'first flood' suppressed" in stream.getvalue()


def test_pending_summaries_are_written_when_logging_shuts_down(
    limited: tuple[logging.Logger, io.StringIO, FakeClock, logging.Handler],
) -> None:
    logger, stream, _, handler = limited
    for _ in range(15):
        logger.warning("stuck %s", "x")
    handler.close()
    assert "5 more messages like 'stuck %s' suppressed" in stream.getvalue()


async def test_on_the_event_loop_the_summary_comes_when_the_window_ends() -> None:
    limiter = RateLimiter(burst=2, window=0.2)
    stream = io.StringIO()
    handler = logs.setup(logging.INFO, LogFormat.TEXT, stream=stream, limiter=limiter)
    try:
        logger = logging.getLogger("discoveryd.flood")
        for _ in range(7):
            logger.warning("peer %s refused", "10.0.0.1")
        assert len(stream.getvalue().splitlines()) == 2
        await eventually(lambda: "5 more messages like 'peer %s refused'" in stream.getvalue(), what="summary")
    finally:
        logging.getLogger().removeHandler(handler)


@pytest.mark.parametrize(
    ("file_mode", "dir_mode", "expected"),
    [
        (0o600, 0o700, []),
        (0o644, 0o755, []),
        (0o664, 0o755, ["writable by group (mode 0664)"]),
        (0o666, 0o755, ["writable by group and others (mode 0666)"]),
        (0o602, 0o755, ["writable by others (mode 0602)"]),
        (0o600, 0o777, ["writable by group and others (mode 0777): the config file can be replaced"]),
        (0o600, 0o1777, []),
    ],
)
def test_insecure_config_permissions_are_named(
    tmp_path: Path, file_mode: int, dir_mode: int, expected: list[str]
) -> None:
    d = tmp_path / "etc"
    d.mkdir()
    cfg = d / "discoveryd.yaml"
    cfg.write_text("{}\n")
    os.chmod(cfg, file_mode)
    os.chmod(d, dir_mode)
    problems = logs.insecure_permissions(cfg)
    assert len(problems) == len(expected)
    for problem, want in zip(problems, expected, strict=True):
        assert want in problem
