"""`polymodal` command line: one subcommand per module, imported only when used.

polymodal demo-model DIR [--arch qwen2_vl]     write a tiny random checkpoint (offline)
polymodal generate MODEL --text ... [--image PATH ...] [--video PATH]
polymodal serve MODEL                         OpenAI-compatible server   (extra: serve)
polymodal run-batch -i IN -o OUT --model M    an OpenAI batch file, offline (extra: serve)
polymodal demo MODEL                          Gradio app                 (extra: demo)
polymodal caption INPUTS --model M --out F    resumable batch captioning (.parquet: batch)
polymodal transcribe INPUTS --model M --out F resumable batch transcription (.parquet: batch)
polymodal bench [MODEL] --dummy-weights       engine vs transformers     (CUDA)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from polymodal.config_file import expand_config

# subcommand -> "module:function" taking the parser (adds its arguments) and returning a
# runner `run(args) -> int`; modules import heavy dependencies inside `run`, so every
# command's `--help` works whatever extras are installed.
COMMANDS = {
    "demo-model": "polymodal.cli_basic:demo_model_command",
    "generate": "polymodal.cli_basic:generate_command",
    "serve": "polymodal.server.cli:serve_command",
    "run-batch": "polymodal.server.run_batch:run_batch_command",
    "demo": "polymodal.demo_app:demo_command",
    "caption": "polymodal.caption:caption_command",
    "transcribe": "polymodal.transcribe:transcribe_command",
    "bench": "polymodal.bench:bench_command",
}

# subcommand -> (the extra that installs what it needs, the modules it imports)
EXTRAS = {
    "serve": ("serve", ("fastapi", "uvicorn", "prometheus_client")),
    "run-batch": ("serve", ("fastapi", "httpx", "prometheus_client")),
    "demo": ("demo", ("gradio",)),
}


def missing_extra(command: str) -> str | None:
    """One line naming the `pip install` that `command` needs, or None when it can run."""
    extra, modules = EXTRAS.get(command, (None, ()))
    absent = [m for m in modules if not module_available(m)]
    if not absent:
        return None
    return (
        f"polymodal {command}: needs {', '.join(absent)} (the '{extra}' extra): "
        f"pip install 'polymodal[{extra}]'"
    )


def module_available(module: str) -> bool:
    """Whether `module` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ModuleNotFoundError, ValueError):
        return False


def build_parser(command: str | None) -> tuple[argparse.ArgumentParser, dict]:
    """All subcommands are listed; only `command`'s module is imported (it needs no extra
    until its runner runs)."""
    parser = argparse.ArgumentParser(prog="polymodal", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    runners = {}
    for name, target in COMMANDS.items():
        subparser = sub.add_parser(name)
        if name == command:
            module, func = target.split(":")
            runners[name] = getattr(importlib.import_module(module), func)(subparser)
            # option string -> nargs (0: a switch), for `--config` (config_file.py)
            parser.options = {
                s: action.nargs for action in subparser._actions for s in action.option_strings
            }
    return parser, runners


def main(argv: list[str] | None = None) -> int:
    from polymodal.llm_core.errors import PolymodalError

    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser, runners = build_parser(command)
    argv = expand_config(argv, command, getattr(parser, "options", {}))
    args = parser.parse_args(argv)
    missing = missing_extra(args.command)
    if missing:
        print(missing, file=sys.stderr)
        return 2
    try:
        return runners[args.command](args) or 0
    except PolymodalError as exc:
        print(f"polymodal {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
