"""The ``jstate`` command: ``jstate tour`` and ``jstate inspect PATH``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jstate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("tour", help="walk TensorFlow's variables guide in jstate, printing each step")
    inspect = commands.add_parser(
        "inspect", help="print what a checkpoint holds (TF's inspect_checkpoint), from metadata only"
    )
    inspect.add_argument("path", help="a checkpoint, or a directory of checkpoints")
    inspect.add_argument("--values", action="store_true", help="also print each variable's values")
    inspect.add_argument("--name", help="only this variable")
    args = parser.parse_args(argv)
    if args.command == "tour":
        from ._tour import tour

        tour()
        return 0
    from .checkpoint.inspect import inspect_checkpoint
    from .core.errors import JStateError

    try:
        inspect_checkpoint(args.path, values=args.values, name=args.name)
    except JStateError as e:
        print(f"jstate inspect: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
