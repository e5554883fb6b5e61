"""``selfalign <command>``: a thin layer that parses arguments, loads the config and calls a function.

Commands are discovered, not listed by hand: every module in :mod:`selfalign.stages` is a pipeline
stage (``selfalign red_team …``) and every module in :mod:`selfalign.bench` a benchmark
(``selfalign bench generation …``). Such a module provides ``add_arguments(parser)`` and
``main(args, config)``; its docstring's first line is the help text. Stand-alone tools (``serve``,
``ablate``, ``replicate``, ``compare``, ``ui``, ``profile``) are registered the same way from fixed module paths.

Bad input (a broken params file, a malformed data file) exits with code 2 and one clear line, never a
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from types import ModuleType

from selfalign.config import ConfigError, load_config
from selfalign.io import DataError, UserError

log = logging.getLogger("selfalign")

# top-level tools that are not DVC stages: (command, module path)
TOOLS = (
    ("serve", "selfalign.generation.server"),
    ("ablate", "selfalign.ablation"),
    ("replicate", "selfalign.replicate"),
    ("compare", "selfalign.compare"),
    ("ui", "selfalign.ui"),
    ("profile", "selfalign.profiles"),
)


def _discover(package: str) -> list[tuple[str, ModuleType]]:
    pkg = importlib.import_module(package)
    found = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{package}.{info.name}")
        if hasattr(mod, "main") and hasattr(mod, "add_arguments"):
            found.append((info.name, mod))
    return found


def _summary(mod: ModuleType) -> str:
    return (mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else ""


def _add_command(sub: argparse._SubParsersAction, name: str, mod: ModuleType) -> None:
    p = sub.add_parser(name, help=_summary(mod), description=mod.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    mod.add_arguments(p)
    p.set_defaults(_module=mod)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfalign", description="SELF-ALIGN pipeline commands.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, mod in _discover("selfalign.stages"):
        _add_command(sub, name, mod)
    bench = sub.add_parser("bench", help="benchmarks (speed/quality targets; write a JSON result)")
    bench_sub = bench.add_subparsers(dest="bench", metavar="<benchmark>")
    for name, mod in _discover("selfalign.bench"):
        _add_command(bench_sub, name, mod)
    for name, path in TOOLS:
        if importlib.util.find_spec(path) is not None:
            _add_command(sub, name, importlib.import_module(path))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    mod = getattr(args, "_module", None)
    if mod is None:
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        config = load_config(args.params)
        mod.main(args, config)
    except (ConfigError, DataError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
