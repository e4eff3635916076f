"""One error family (errors.py): every user-facing error derives from LogprobError, messages below the CLI name
settings rather than flags, and the CLI's one edge (cli_errors) turns each class into its exit code and wording."""

import ast
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import logprob_cli
from logprob_cli import cli
from logprob_cli.run._budget import BudgetReached
from logprob_cli.endpoints._base import EndpointError, EndpointFatal, EndpointRejected, EndpointUnsuitable
from logprob_cli.endpoints._factory import SettingsError
from logprob_cli.errors import SETTING_NAMES, LogprobError, Worded
from logprob_cli.io._jsonl import InputError
from logprob_cli.run._journal import JournalError, Refused
from logprob_cli.endpoints._vocabulary import VocabularyError
from test_method_specs import _cli_flags, _strings

EXIT = {
    SettingsError: 2, InputError: 2, VocabularyError: 2, Refused: 2, JournalError: 1, EndpointError: 1,
    EndpointFatal: 1, EndpointRejected: 1, EndpointUnsuitable: 1, BudgetReached: 3,
}
ALLOWED = {  # (module, string) pairs that must name a flag, and why
    ("_estimate.py", "unknown (give --price)"),  # a cell of the CLI's own estimate table
}
CLI_ONLY = {"cli.py", "_display.py"}  # the command line and its progress display


def test_every_user_facing_error_derives_from_the_base_and_keeps_its_builtin_base():
    assert all(issubclass(kind, LogprobError) for kind in EXIT)
    assert issubclass(SettingsError, ValueError) and issubclass(VocabularyError, ValueError)
    assert issubclass(JournalError, RuntimeError) and issubclass(EndpointError, RuntimeError)


def test_no_module_below_the_cli_writes_a_cli_flag_into_a_string():
    flags = _cli_flags()
    package = Path(logprob_cli.__file__).parent
    found = [
        (path.name, text)
        for path in package.rglob("*.py") if path.name not in CLI_ONLY
        for text in _strings(ast.parse(path.read_text()))
        if any(flag in text for flag in flags) and (path.name, text) not in ALLOWED
    ]
    assert not found


def test_the_cli_words_every_setting_a_message_may_name():
    assert set(cli.FLAGS) == set(SETTING_NAMES)


def test_a_method_that_does_not_fit_names_the_alternative_as_each_interface_takes_it():
    from logprob_cli.methods._base import _not_post_bias
    error = _not_post_bias("topk", 7, 100.0, steers=True)
    assert 'Use method="bisection"' in str(error) and "topk needs returned logprobs" in str(error)
    assert 'Use --method="bisection"' in cli.cli_message(error) and "token 7 biased by +100.00" in cli.cli_message(error)


def test_a_worded_message_reads_as_settings_for_python_and_as_flags_for_the_cli():
    error = EndpointFatal(Worded("name it with {tokenizer} or use {api_chat} ({raw})", raw="{x}"))
    assert str(error) == 'name it with tokenizer or use api="chat" ({x})'
    assert cli.cli_message(error) == "name it with --tokenizer or use --api chat ({x})"


@pytest.mark.parametrize("kind", list(EXIT), ids=lambda kind: kind.__name__)
def test_the_cli_edge_maps_each_class_to_its_exit_code(kind):
    if kind is InputError:
        error = InputError([Worded("line 1: use {api_chat}")], "in.jsonl")
    else:
        error = kind("bad {fresh}" if kind is SettingsError else Worded("bad {fresh}"))
    app = typer.Typer()

    @app.command()
    @cli.cli_errors
    def fails() -> None:
        raise error

    result = CliRunner().invoke(app, [])
    assert result.exit_code == EXIT[kind], result.output
    assert "Traceback" not in result.output
    assert ("--api chat" if kind is InputError else "--fresh") in result.output
