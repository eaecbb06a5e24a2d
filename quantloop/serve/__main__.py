"""`python -m quantloop.serve [--root DIR] [--http PORT]`: the same server as `quantloop mcp`."""

import sys

from quantloop.errors import single_command_main
from quantloop.serve.command import add_mcp_command

if __name__ == "__main__":
    sys.exit(single_command_main(add_mcp_command, "mcp"))
