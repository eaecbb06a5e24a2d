"""`python -m quantloop.report RUN_ID [--tracking-uri URI] [--out DIR] [--no-mlflow]`: the same as `quantloop report`."""

import sys

from quantloop.errors import single_command_main
from quantloop.report.command import add_report_command

if __name__ == "__main__":
    sys.exit(single_command_main(add_report_command, "report"))
