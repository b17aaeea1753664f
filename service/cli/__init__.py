"""The `convtune` command line.

Each command group lives in its own module and registers its subcommands through a
`register(subparsers)` function. Modules are imported lazily per command so that
`convtune --help` and the service-only install never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module that implements it (module.register adds the subparser, module.run_<cmd> runs it)
COMMAND_MODULES: dict[str, str] = {
    "param-groups": "service.cli.inspect",
    "schedule": "service.cli.inspect",
    "train": "service.cli.train",
    "sweep": "service.cli.sweep",
    "up": "service.cli.stack",
    "down": "service.cli.stack",
    "demo": "service.cli.stack",
    "serve": "service.cli.stack",
    "submit": "service.cli.client",
    "status": "service.cli.client",
    "watch": "service.cli.client",
    "cancel": "service.cli.client",
    "resume": "service.cli.client",
    "logs": "service.cli.client",
    "open": "service.cli.client",
    "export": "service.cli.export",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convtune",
        description=(
            "Tune ConvNeXtV2 finetuning on Ray: inspect the optimizer factory, train one finetune, "
            "run sweeps locally, or run the service stack and submit sweeps to it."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    registered: set[str] = set()
    for module_name in dict.fromkeys(COMMAND_MODULES.values()):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # a command group not built yet, or an optional dependency missing
            if exc.name and exc.name.startswith(module_name):
                continue
            raise
        module.register(sub)
        registered.update(sub.choices)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
