"""`--config FILE` (vLLM's): a command's options from a YAML file, one key per long option
(`max_model_len: 8192` or `max-model-len: 8192`; `true` for a switch, `false` for its `--no-`
form or nothing; a list for options that take several values; a mapping for JSON options; a
`model` key for the model when the command line names none). Options given on the command line
win over the file's (they come after it)."""

from __future__ import annotations

import json
from pathlib import Path


def expand_config(argv: list[str], command: str | None, options: dict) -> list[str]:
    """`argv` with `--config FILE` replaced by the file's options, placed right after
    `command`; `options`: the command's option strings -> their argparse `nargs` (0 for a
    switch), to tell `--no-` switches and whether the command line names the model."""
    at = next((i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")),
              None)  # fmt: skip
    if at is None or command is None or "--config" not in options:
        return argv
    if argv[at] == "--config":
        if at + 1 >= len(argv):
            raise SystemExit("polymodal: --config needs a YAML file")
        path, rest = argv[at + 1], argv[:at] + argv[at + 2 :]
    else:
        path, rest = argv[at].split("=", 1)[1], argv[:at] + argv[at + 1 :]
    values = _load(path)
    spot = rest.index(command) + 1
    model = values.pop("model", None)
    extra = [str(model)] if model is not None and not _has_positional(rest[spot:], options) else []
    for key, value in values.items():
        flag = "--" + str(key).replace("_", "-")
        if value is None or value is False and f"--no-{flag[2:]}" not in options:
            continue
        if value is True:
            extra.append(flag)
        elif value is False:
            extra.append(f"--no-{flag[2:]}")
        elif isinstance(value, list):
            extra += [flag, *(json.dumps(v) if isinstance(v, dict) else str(v) for v in value)]
        elif isinstance(value, dict):
            extra += [flag, json.dumps(value)]
        else:
            extra += [flag, str(value)]
    return rest[:spot] + extra + rest[spot:]


def _has_positional(args: list[str], options: dict) -> bool:
    """Whether `args` (a command's) hold a positional argument, skipping options' values."""
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("-"):
            return True
        nargs = options.get(token, None) if "=" not in token else 0
        i += 1
        if nargs in ("+", "*", "?"):
            while i < len(args) and not args[i].startswith("-"):
                i += 1
                if nargs == "?":
                    break
        else:
            i += 1 if nargs is None else nargs
    return False


def _load(path: str) -> dict:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"polymodal: --config {path}: no such file")
    try:
        values = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SystemExit(f"polymodal: --config {path}: not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise SystemExit(f"polymodal: --config {path}: a mapping of options is needed")
    return values
