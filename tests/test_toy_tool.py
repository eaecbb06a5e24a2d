"""Adding a tool is one module and one registry line: a toy tool registered here is served over MCP (the SDK's
own client, in memory) and LangChain, with its schema, its confinement to the data folder and its report, and
named by `quantloop mcp --help`, with no other file changed."""

import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from mcp import Client
from pydantic import Field

from quantloop.schemas import Strict
from quantloop.serve.mcp_server import build_server
from quantloop.tools.catalog import TOOLS, ToolEntry, register_tool, tools, unregister_tool
from quantloop.tools.langchain import as_langchain_tools


class WordCountRequest(Strict):
    text_file: str = Field(description="a text file under the data folder")


class WordCountReport(Strict):
    words: int
    lines: int


def count_words(request: WordCountRequest) -> WordCountReport:
    text = Path(request.text_file).read_text()
    return WordCountReport(words=len(text.split()), lines=len(text.splitlines()))


WORD_COUNT = ToolEntry("word_count", "Count the words and lines of a text file.", WordCountRequest, WordCountReport,
                       count_words, path_fields=("text_file",))


@pytest.fixture
def toy_tool():
    entry = register_tool(WORD_COUNT)
    yield entry
    unregister_tool(entry)


def test_a_registered_tool_is_served_over_mcp_within_the_data_folder(toy_tool, tmp_path):
    (tmp_path / "poem.txt").write_text("one two three\nfour five\n")
    (tmp_path.parent / "outside.txt").write_text("secret words here\n")

    async def go():
        async with Client(build_server(tmp_path)) as client:
            listed = {t.name: t for t in (await client.list_tools()).tools}
            inside = await client.call_tool("word_count", {"text_file": "poem.txt"})
            outside = await client.call_tool("word_count", {"text_file": "../outside.txt"})
            return listed, inside, outside

    listed, inside, outside = anyio.run(go)
    assert list(listed) == [t.name for t in TOOLS] + ["word_count"]
    assert listed["word_count"].input_schema == WordCountRequest.model_json_schema()
    assert not inside.is_error and inside.structured_content == {"words": 5, "lines": 2}
    assert outside.is_error and "outside.txt" in outside.content[0].text  # the path check covers the new tool too


def test_a_registered_tool_is_a_langchain_tool(toy_tool, tmp_path):
    (tmp_path / "poem.txt").write_text("a b c d\n")
    by_name = {t.name: t for t in as_langchain_tools()}
    assert set(by_name) == {t.name for t in tools()} and "word_count" in by_name
    assert WordCountReport.model_validate_json(by_name["word_count"].invoke({"text_file": str(tmp_path / "poem.txt")})).words == 4


def test_a_tool_name_is_registered_once(toy_tool):
    with pytest.raises(Exception, match="exists already"):
        register_tool(WORD_COUNT)
    assert [t.name for t in tools()].count("word_count") == 1


def test_the_built_in_tools_stay_when_nothing_is_registered():
    assert tools() == TOOLS
    help_text = subprocess.run([sys.executable, "-m", "quantloop.pipelines.cli", "mcp", "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert "word_count" not in help_text and all(t.name in help_text for t in TOOLS)
