"""``sara-ds``: the command-line entry point (``sara-ds bench ...``; also ``python -m sara_ds``)."""
from __future__ import annotations

import sys

COMMANDS = {"bench": "pretrain the example model with every method and write the evidence report"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"sara-ds: unknown command {argv[0]!r}", file=sys.stderr)
        print("usage: sara-ds COMMAND [options]\n\ncommands:", file=sys.stderr)
        for name, what in COMMANDS.items():
            print(f"  {name:8s} {what}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from . import bench

    return bench.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
