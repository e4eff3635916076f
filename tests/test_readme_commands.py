"""The README's commands name only options their subcommand has (a reader pastes them as they are)."""

import re
import shlex
from pathlib import Path

import typer.main

from logprob_cli.cli import app

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands() -> list[str]:
    """Every `logprobs ...` command of the README's indented code blocks (continuation lines joined; each part of
    a line joined by &&, | or ; or put in the background by &)."""
    commands, pending = [], ""
    for line in README.read_text().splitlines():
        if not line.startswith("    "):
            pending = ""
            continue
        text = pending + line.strip()
        pending = text[:-1] + " " if text.endswith("\\") else ""
        if not pending:
            text = re.split(r"\s#\s", text)[0]  # a comment
            commands += [part.strip() for part in re.split(r"&&|\|\s|;|\s&(?:\s|$)", text)
                         if part.strip().startswith("logprobs ")]
    return commands


def test_every_readme_command_uses_options_its_subcommand_has():
    group = typer.main.get_command(app)
    commands = readme_commands()
    assert len(commands) >= 20, "the README's commands were not found"
    unknown = []
    for command in commands:
        words = shlex.split(command)
        name = words[1]
        if name.startswith("-"):  # logprobs --version
            continue
        assert name in group.commands, f"{command!r}: no subcommand {name!r}"
        options = {opt for param in group.commands[name].params for opt in param.opts + param.secondary_opts}
        options |= {"--help"}
        for word in words[2:]:
            flag = word.split("=")[0]
            if flag.startswith("-") and flag != "-" and flag not in options:
                unknown.append(f"{command!r}: {flag}")
    assert not unknown
