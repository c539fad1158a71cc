"""`polymodal` command line: one subcommand per module, imported only when used.

polymodal demo-model DIR [--arch qwen2_vl]     write a tiny random checkpoint (offline)
polymodal generate MODEL --text ... [--image PATH ...] [--video PATH]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# subcommand -> "module:function" taking the parser (adds its arguments) and returning a
# runner `run(args) -> int`; modules import heavy dependencies inside `run`.
COMMANDS = {
    "demo-model": "polymodal.cli_basic:demo_model_command",
    "generate": "polymodal.cli_basic:generate_command",
}


def _optional_commands() -> dict[str, str]:
    """Subcommands of other modules (server, demo app, batch jobs, bench) when present."""
    extra = {
        "serve": "polymodal.server.cli:serve_command",
        "demo": "polymodal.demo_app:demo_command",
        "caption": "polymodal.caption:caption_command",
        "bench": "polymodal.bench:bench_command",
    }
    return {name: t for name, t in extra.items() if _module_exists(t.split(":")[0])}


def _module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="polymodal", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    runners = {}
    for name, target in {**COMMANDS, **_optional_commands()}.items():
        module, func = target.split(":")
        runners[name] = getattr(importlib.import_module(module), func)(sub.add_parser(name))
    return parser, runners


def main(argv: list[str] | None = None) -> int:
    from polymodal.llm_core.errors import PolymodalError

    parser, runners = build_parser()
    args = parser.parse_args(argv)
    try:
        return runners[args.command](args) or 0
    except PolymodalError as exc:
        print(f"polymodal {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
