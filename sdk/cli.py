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


def build_parser(command: str | None) -> tuple[argparse.ArgumentParser, dict]:
    """All subcommands are listed; only `command`'s module is imported (its deps may be
    optional extras: the server's FastAPI, Gradio, Ray)."""
    parser = argparse.ArgumentParser(prog="polymodal", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    runners = {}
    for name, target in {**COMMANDS, **_optional_commands()}.items():
        subparser = sub.add_parser(name)
        if name == command:
            module, func = target.split(":")
            runners[name] = getattr(importlib.import_module(module), func)(subparser)
    return parser, runners


def main(argv: list[str] | None = None) -> int:
    from polymodal.llm_core.errors import PolymodalError

    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser, runners = build_parser(command)
    args = parser.parse_args(argv)
    try:
        return runners[args.command](args) or 0
    except PolymodalError as exc:
        print(f"polymodal {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
