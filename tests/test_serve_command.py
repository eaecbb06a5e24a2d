"""`quantloop mcp`'s help: the tools it names are the catalog's, as the parser prints them."""

import re

import pytest

from quantloop.pipelines.cli import main
from quantloop.tools.catalog import TOOLS


@pytest.mark.parametrize("argv, listing", [
    (["mcp", "--help"], r"Tools: (.*?)\. Models"),  # the command's own help (its epilog)
    (["--help"], r"serve the tools \((.*?)\) over MCP"),  # its line in the list of commands
])
def test_the_mcp_help_lists_every_tool_of_the_catalog(capsys, argv, listing):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    listed = re.search(listing, out)
    assert listed and listed.group(1).split(", ") == [t.name for t in TOOLS], out
