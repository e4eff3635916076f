"""The one family of errors a user of logprob_cli sees, and how their messages name settings.

Hierarchy (each class lives beside the code that raises it; `except LogprobError` catches them all):

    LogprobError                      errors.py
    ├── SettingsError(ValueError)     endpoints/_factory.py settings that cannot work together  (CLI exit 2)
    ├── InputError                    io/_jsonl.py          the prompts cannot be used          (CLI exit 2)
    ├── CompareError(ValueError)      io/_compare.py        two outputs cannot be compared      (CLI exit 2)
    ├── ImageError(ValueError)        io/_image.py          the image file cannot be used       (CLI exit 2)
    ├── VocabularyError(ValueError)   endpoints/_vocabulary.py the named vocabulary cannot load (CLI exit 2)
    ├── JournalError(RuntimeError)    run/_journal.py       the checkpoint cannot be used       (CLI exit 1)
    │   └── Refused                                        files at the output's place          (CLI exit 2)
    ├── EndpointError(RuntimeError)   endpoints/_base.py    the endpoint failed or refused      (CLI exit 1)
    │   ├── EndpointFatal                                  every request would fail the same way
    │   └── EndpointRejected                               this request is invalid for the endpoint
    ├── EndpointUnsuitable(RuntimeError) endpoints/_base.py the endpoint does not fit a method  (CLI exit 1)
    └── BudgetReached                 run/_budget.py        the next call would cross a cap     (CLI exit 3)

The builtin second bases keep older callers' `except ValueError` / `except RuntimeError` working.
The CLI is the only place that turns these into exit codes and wording (cli.py, `cli_errors`).

Messages name settings, not command-line flags: a message that names one is built with `Worded`,
its template naming each setting by a field of SETTING_NAMES (`{tokenizer}`, `{api_chat}`, ...).
`str(error)` reads them as the Python API names them (`tokenizer`, `api="chat"`); `error.worded(FLAGS)`
as another interface names them (the CLI: `--tokenizer`, `--api chat`).
"""

from __future__ import annotations

from typing import Any, Mapping

SETTING_NAMES = {
    "model": "model", "base_url": "base_url", "api_key": "api_key", "tokenizer": "tokenizer",
    "post_bias": "post_bias", "extra_body": "extra_body", "rpm": "rpm", "tpm": "tpm",
    "simulator": "simulator settings", "price": "price", "max_cost": "max_cost", "max_calls": "max_calls",
    "method": "method", "method_auto": 'method="auto"', "api": "api", "api_chat": 'api="chat"',
    "api_completions": 'api="completions"',
    "fresh": "fresh=True", "output": "output", "targets": "targets", "store": "store", "image": "image", "max_draws": "max_draws",
}  # how the Python API names each setting a message may name


class Worded(str):
    """A message naming settings: reads as `template` with SETTING_NAMES, and `worded(names)` otherwise.

    `values` fill the template's other fields (free text that may hold braces, so it is never part of the
    template itself).
    """

    template: str
    values: Mapping[str, Any]

    def __new__(cls, template: str, **values: Any) -> Worded:
        text = super().__new__(cls, template.format(**SETTING_NAMES, **values))
        text.template, text.values = template, values
        return text

    def worded(self, names: Mapping[str, str]) -> str:
        return self.template.format(**{**SETTING_NAMES, **names}, **self.values)

    def __getnewargs_ex__(self) -> tuple[tuple[str], dict[str, Any]]:  # copies and pickles rebuild from the template
        return (self.template,), dict(self.values)


class LogprobError(Exception):
    """The base of every error logprob_cli raises for a user to read (see the module docstring).

    Its message says what went wrong and what to do; `worded(names)` is that message with its settings named
    by `names` (a message that names none reads the same).
    """

    def worded(self, names: Mapping[str, str]) -> str:
        return reworded(message_of(self), names)


def message_of(error: BaseException) -> str:
    """`error`'s message, kept a Worded when it names settings (so that an interface can word them its way
    after the error was recorded as text: a prompt's failure, the budget cap a run stopped at)."""
    message = error.args[0] if len(error.args) == 1 else None
    if isinstance(message, Worded) and str(error) == message:
        return message
    return str(error)


def prefixed(prefix: str, text: str) -> str:
    """`prefix: text`, kept a Worded when `text` is one."""
    if not isinstance(text, Worded):
        return f"{prefix}: {text}"
    return Worded("{_prefix}: " + text.template, _prefix=prefix, **text.values)


def reworded(text: str, names: Mapping[str, str]) -> str:
    """`text` with its settings named by `names` when it is a Worded; other text as it is."""
    return text.worded(names) if isinstance(text, Worded) else text
