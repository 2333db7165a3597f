"""Every `realisid` command shown in README.md and docs/ names a subcommand and flags that the CLI has: a doc example
whose command or flag was renamed fails here (the executed guide and the tests run the commands themselves)."""

import argparse
import re
import shlex
from pathlib import Path

import pytest

from realisid_jax.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _commands(text: str) -> list[str]:
    """Each `realisid ...` line of the page's fenced code blocks, joined with its backslash continuations."""
    commands, blocks = [], re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("realisid "):
                commands.append(line)
    return commands


def _subparser(parser: argparse.ArgumentParser, words: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The deepest subcommand parser that ``words`` name, and the words after it."""
    while words:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or words[0] not in actions[0].choices:
            break
        parser, words = actions[0].choices[words[0]], words[1:]
    return parser, words


CASES = [(page, command) for page in PAGES for command in _commands(page.read_text(encoding="utf-8"))]


def test_the_docs_show_commands():
    assert len(CASES) > 20


@pytest.mark.parametrize("page, command", CASES, ids=[f"{p.name}:{c[:40]}" for p, c in CASES])
def test_documented_command_exists(page, command):
    words = shlex.split(command.replace("[", " ").replace("]", " ").replace("|", " "))[1:]
    parser, rest = _subparser(build_parser(), words)
    assert parser.prog != "realisid", f"{page.name}: `{command}` names no subcommand"
    known = {s for a in parser._actions for s in a.option_strings}
    flags = {w.split("=")[0] for w in rest if w.startswith("--") and not w.startswith("--config.")}
    unknown = sorted(flags - known)
    assert not unknown, f"{page.name}: `{command}`: {parser.prog} has no {', '.join(unknown)}"
