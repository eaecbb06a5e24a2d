"""`python -m quantloop.serve [--root DIR] [--http PORT]`: the same server as `quantloop mcp`."""

import argparse
import sys

from quantloop.errors import InputError
from quantloop.serve.command import add_mcp_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quantloop")
    add_mcp_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["mcp", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except InputError as e:
        print(f"quantloop: error: {e.line()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
