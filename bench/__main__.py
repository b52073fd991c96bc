"""Run benchmarks by name: `python -m bench` (all), `python -m bench index dns`, `python -m bench dns --rounds 5`.

Each benchmark is a module `bench/<name>_bench.py` with `main(argv: list[str]) -> None`
that prints a table and writes its figures to `bench/results/<name>.json`.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name[: -len("_bench")] for m in pkgutil.iter_modules([str(here)]) if m.name.endswith("_bench"))


def main() -> None:
    args = sys.argv[1:]
    # Leading words name benchmarks; everything from the first option on goes to each of them.
    split = next((i for i, a in enumerate(args) if a.startswith("-")), len(args))
    names, extra = args[:split] or available(), args[split:]
    unknown = [n for n in names if n not in available()]
    if unknown:
        sys.exit(f"unknown benchmark(s) {unknown}; available: {available()}")
    for name in names:
        print(f"== {name} ==", flush=True)
        importlib.import_module(f"bench.{name}_bench").main(extra)


if __name__ == "__main__":
    main()
