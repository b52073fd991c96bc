"""The `discoveryd` command: run, check, dump, status, version.

`run` and `check` read the config file (`--config`, else
./config/discoveryd.yaml, else /etc/discoveryd/discoveryd.yaml). `dump` and
`status` ask a running daemon through its admin API (`--admin`, else the
`admin.listen` of that config file).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from discoveryd import __version__, logs
from discoveryd import config as config_mod
from discoveryd.config import Config, ConfigError, split_hostport
from discoveryd.logs import LogFormat
from discoveryd.model import Severity
from discoveryd.registry import OfflineChecker
from discoveryd.supervisor import Supervisor, build_registry

log = logging.getLogger("discoveryd")


def _load(path_arg: str | None) -> Config | None:
    """The config, or None after printing each of its problems to stderr."""
    try:
        return config_mod.load(config_mod.find_config(path_arg))
    except ConfigError as e:
        _print_problems(e.problems)
        return None


def _print_problems(problems: Sequence[str]) -> None:
    for p in problems:
        print(p, file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return 1
    logs.setup(
        getattr(logging, (args.log_level or cfg.log_level.value).upper()),
        LogFormat(args.log_format) if args.log_format else cfg.log_format,
    )
    for problem in logs.insecure_permissions(cfg.path):
        log.warning("config: %s; anyone who can write it decides what discoveryd serves", problem)
    log.info("discoveryd %s starting with %s", __version__, cfg.path)
    code = 1
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        try:
            code = runner.run(Supervisor(cfg).run())
        except* OSError as group:  # a server could not bind: say which, exit 1
            for err in group.exceptions:
                log.error("%s", err)
    return code


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return 1
    for warning in logs.insecure_permissions(cfg.path):
        print(f"warning: {warning}", file=sys.stderr)
    problems: list[str] = []
    warnings: list[str] = []
    for reg_cfg in cfg.registries:
        try:
            registry = build_registry(reg_cfg, cfg)
        except Exception as e:  # a factory that rejects its config is a config problem
            problems.append(f"{cfg.path}: registry {reg_cfg.source}: {e}")
            continue
        if isinstance(registry, OfflineChecker):
            for p in registry.check():
                (warnings if p.severity is Severity.WARNING else problems).append(str(p))
    # Warnings (served as written, probably not what was meant) are shown but do not fail the check,
    # as Istio's analyzer reports them without rejecting the configuration.
    _print_problems(warnings)
    noted = f", {len(warnings)} warning(s)" if warnings else ""
    if problems:
        _print_problems(problems)
        print(f"{len(problems)} problem(s) found{noted}", file=sys.stderr)
        return 1
    print(f"{cfg.path}: ok ({len(cfg.registries)} registries{noted})")
    return 0


def _admin_get(args: argparse.Namespace, path: str) -> Any:
    if args.admin:
        address = args.admin
    else:
        cfg = _load(args.config)
        if cfg is None:
            raise SystemExit(1)
        address = cfg.admin.listen
    host, port = split_hostport(address)
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    import urllib.error
    import urllib.request

    url = f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.load(resp)
    except (urllib.error.URLError, OSError) as e:
        print(f"cannot reach the discoveryd admin API at {url}: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def cmd_dump(args: argparse.Namespace) -> int:
    json.dump(_admin_get(args, "/debug/indexz"), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from discoveryd.xds import status as xds_status

    print(xds_status.render(_admin_get(args, "/debug/syncz")))
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"discoveryd {__version__}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="discoveryd", description="Service discovery: registries in, xDS and DNS out.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", help="config file (default: ./config/discoveryd.yaml, /etc/discoveryd/...)")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="override log_level")
    run.add_argument("--log-format", choices=[f.value for f in LogFormat], help="override log_format (text, json)")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate the config and every registry file readable offline")
    check.add_argument("--config")
    check.set_defaults(func=cmd_check)

    for name, func, text in (
        ("dump", cmd_dump, "print the running daemon's index as JSON"),
        ("status", cmd_status, "show connected xDS clients and their sync state"),
    ):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("--config", help="read admin.listen from this config")
        sp.add_argument("--admin", help="admin address host:port (default: admin.listen of the config)")
        sp.set_defaults(func=func)

    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=cmd_version)
    return p


_BROKEN_PIPE = 141
"""Exit status when stdout's reader went away (`discoveryd dump | head`): 128 + SIGPIPE, as for other tools."""


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code = int(args.func(args))
        sys.stdout.flush()
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's final flush finds no broken pipe either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return _BROKEN_PIPE
    return code


if __name__ == "__main__":
    sys.exit(main())
