"""The README is a map that cannot go stale: short, its package list equal to quantloop/'s packages, every
`quantloop COMMAND` and `make TARGET` it names real, every relative link in it and in docs/ pointing at a file,
and every table in docs/ preceded by a line starting with "Command:" that names what makes it.

Fast: reads files and builds the CLI's argument parser; no model, no subprocess."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 260

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
SPAN = re.compile(r"`([^`]+)`")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
QUANTLOOP_COMMAND = re.compile(r"(?<![\w/.-])quantloop ([a-z][a-z0-9-]*)")
MAKE_TARGET = re.compile(r"(?<![\w/.-])make ([a-z][a-z0-9_-]*)")


def readme() -> str:
    return README.read_text(encoding="utf-8")


def code_texts(markdown: str) -> list[str]:
    """The code in a markdown text: fenced blocks, then inline spans of what is left (a span may wrap a line),
    whitespace collapsed."""
    blocks = [m.group(0) for m in FENCE.finditer(markdown)]
    rest = FENCE.sub("", markdown)
    spans = [m.group(1) for m in SPAN.finditer(rest)]
    return [" ".join(t.split()) for t in blocks] + [" ".join(t.split()) for t in spans]


def section(markdown: str, title: str) -> str:
    """The text of the `## TITLE` section, up to the next `## `."""
    lines = markdown.splitlines()
    start = next((i for i, l in enumerate(lines) if l.strip().lower() == f"## {title}".lower()), None)
    assert start is not None, f"README.md has no '## {title}' section"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start:end])


def packages() -> set[str]:
    """Every package of quantloop/: a folder (not a link) holding Python files; a namespace package counts."""
    return {d.name for d in (ROOT / "quantloop").iterdir()
            if d.is_dir() and not d.is_symlink() and not d.name.startswith(("_", ".")) and any(d.rglob("*.py"))}


def cli_commands() -> set[str]:
    from quantloop.pipelines.cli import build_parser

    parser = build_parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert subparsers, "quantloop's parser has no subcommands"
    return {name for a in subparsers for name in a.choices}


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([A-Za-z0-9_-]+)\s*:(?!=)", text, re.M))
    for phony in re.findall(r"^\.PHONY\s*:(.*)$", text, re.M):
        targets |= set(phony.split())
    return targets


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def test_readme_is_short():
    n = len(readme().splitlines())
    assert n < MAX_README_LINES, f"README.md has {n} lines; keep it a map (under {MAX_README_LINES}) and move detail to docs/"


def test_the_architecture_section_names_every_package_and_only_real_ones():
    named = set(re.findall(r"quantloop/([A-Za-z_][A-Za-z0-9_]*)/", section(readme(), "Architecture")))
    real = packages()
    assert real, "no packages found under quantloop/"
    assert not real - named, f"packages missing from the README's Architecture section: {sorted(real - named)}"
    assert not named - real, f"the README's Architecture section names packages that do not exist: {sorted(named - real)}"


def test_every_quantloop_command_named_in_the_readme_exists():
    named = {m.group(1) for t in code_texts(readme()) for m in QUANTLOOP_COMMAND.finditer(t)}
    assert "run" in named, "the README should name `quantloop run`"
    real = cli_commands()
    assert not named - real, f"the README names commands quantloop does not have: {sorted(named - real)} (it has {sorted(real)})"


def test_the_readme_lists_every_subcommand():
    table = section(readme(), "Commands")
    listed = {m.group(1) for t in code_texts(table) for m in QUANTLOOP_COMMAND.finditer(t)}
    missing = cli_commands() - listed
    assert not missing, f"subcommands missing from the README's Commands section: {sorted(missing)}"


def test_every_make_target_named_exists():
    named = {m.group(1) for t in code_texts(readme()) for m in MAKE_TARGET.finditer(t)}
    assert {"run", "test"} <= named
    real = make_targets()
    assert not named - real, f"the README names make targets the Makefile lacks: {sorted(named - real)}"


def test_every_relative_link_points_at_a_file():
    broken = []
    for md in markdown_files():
        for target in LINK.findall(FENCE.sub("", md.read_text(encoding="utf-8"))):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL, or an anchor in the same page
            path = target.split("#", 1)[0]
            if not (md.parent / path).exists():
                broken.append(f"{md.relative_to(ROOT)}: {target}")
    assert not broken, "relative links to missing files:\n" + "\n".join(broken)


SOURCE_PATH = re.compile(r"`((?:quantloop|backends|gguf|search|eval|tools|agents|pipelines|models|data|serve|report)/[\w/.-]*)`")


def test_every_source_path_named_exists():
    """A module that moves (backends/qat.py -> backends/qat/) cannot leave the README or docs/ naming its old path."""
    missing = []
    for md in markdown_files():
        for named in SOURCE_PATH.findall(md.read_text(encoding="utf-8")):
            rel = named if named.startswith("quantloop/") else f"quantloop/{named}"
            if not (ROOT / rel.rstrip("/")).exists():
                missing.append(f"{md.relative_to(ROOT)}: {named}")
    assert not missing, "paths in the docs that do not exist:\n" + "\n".join(missing)


def test_every_docs_page_is_linked_from_the_readme():
    pages = sorted(DOCS.glob("*.md"))
    assert pages, "docs/ has no pages"
    linked = {(README.parent / t.split("#", 1)[0]).resolve() for t in LINK.findall(readme())}
    unlinked = [p.name for p in pages if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def tables_without_command(text: str) -> list[int]:
    """Line numbers of tables with no line starting with "Command:" between them and the heading or table
    before them. Tables inside fenced code blocks are not tables."""
    missing, seen_command, in_table, in_fence = [], False, False, False
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        is_row = line.lstrip().startswith("|")
        if is_row and not in_table:
            if not seen_command:
                missing.append(n)
            seen_command = False
        in_table = is_row
        if line.startswith("#"):
            seen_command = False
        elif line.startswith("Command:"):
            seen_command = True
    return missing


def test_every_docs_table_names_the_command_that_makes_it():
    bad = [f"docs/{p.name}:{n}" for p in sorted(DOCS.glob("*.md")) for n in tables_without_command(p.read_text(encoding="utf-8"))]
    assert not bad, 'tables without a preceding "Command:" line:\n' + "\n".join(bad)


def test_the_table_check_sees_a_table_without_a_command():
    assert tables_without_command("# t\n\nCommand: `make bench`\n\n| a |\n|---|\n| 1 |\n\ntext\n\n| b |\n|---|\n") == [11]
    assert tables_without_command("```\n| not a table |\n```\n") == []
