"""`python -m quantloop.report RUN_ID [--tracking-uri URI] [--out DIR] [--no-mlflow]`: the same as `quantloop report`."""

import argparse
import sys

from quantloop.errors import InputError
from quantloop.report.command import add_report_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quantloop")
    add_report_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except InputError as e:
        print(f"quantloop: error: {e.line()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
