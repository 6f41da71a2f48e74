"""The `meshwright` command line. Thin: parse arguments, call the library, print.

Every command registers itself with `_command(name, help)`; its parser arguments are added
in `_add_<name>_arguments` and its work is in `_run_<name>`. Every command takes `--json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

_COMMANDS: dict[str, tuple[str, Callable, Callable]] = {}


def _command(name: str, help: str):
    """Register `_run_<name>` with its argument builder under subcommand `name`."""

    def register(run: Callable) -> Callable:
        add_arguments = globals().get(f"_add_{name.replace('-', '_')}_arguments", lambda p: None)
        _COMMANDS[name] = (help, add_arguments, run)
        return run

    return register


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


# ---------------------------------------------------------------------------------------------
# meshwright inspect MODEL


def _add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="a bundled model preset (default: %(default)s -> the default small model)")
    p.add_argument("--phase", choices=("prefill", "decode"), default="decode")
    p.add_argument("--batch", type=int, default=2, help="batch of the example inputs")
    p.add_argument("--length", type=int, default=8, help="prompt length for prefill")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set n_layers=4 (repeatable)")
    p.add_argument("--scan", action="store_true", help="layers as a scan (--set scan_layers=true)")
    p.add_argument("--dot", metavar="FILE", help="also write the graph as Graphviz DOT")
    p.add_argument("--summary", action="store_true", help="print op counts, FLOPs and bytes")


@_command("inspect", "print the dataflow graph of a bundled model")
def _run_inspect(args) -> int:
    from meshwright import api
    from meshwright.models import DEFAULT_MODEL, get_config

    name = args.model or DEFAULT_MODEL
    cfg = get_config(name).with_overrides(args.set)
    if args.scan:
        cfg = cfg.replace(scan_layers=True)
    graph = api.trace_model(cfg, phase=args.phase, batch=args.batch, length=args.length)
    if args.dot:
        with open(args.dot, "w") as f:
            f.write(graph.to_dot())
    if args.json:
        out = {"model": cfg.name, "phase": args.phase, "graph": str(graph).splitlines(),
               "summary": graph.summary()}
        if args.dot:
            out["dot"] = args.dot
        _print_json(out)
        return 0
    print(graph)
    if args.summary:
        print()
        print(graph.format_summary())
    if args.dot:
        print(f"\nwrote {args.dot}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshwright",
        description="Shard Transformer inference across device meshes: trace, plan, rewrite, "
                    "lower, run and serve.")
    from meshwright import __version__

    parser.add_argument("--version", action="version", version=f"meshwright {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help, add_arguments, _) in _COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        add_arguments(p)
        p.add_argument("--json", action="store_true", help="print one JSON object for machines")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    _, _, run = _COMMANDS[args.command]
    try:
        return run(args) or 0
    except (KeyError, ValueError) as e:  # user errors: a clear message, no traceback
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        if getattr(args, "json", False):
            _print_json({"error": str(msg)})
        else:
            print(f"meshwright {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
