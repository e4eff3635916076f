"""The input and output side of chosen tokens ("targets"): JSONL, the Python API's prompts, the checkpoint, Parquet."""

from logprob_cli.endpoints._base import Prompt
from logprob_cli.run._journal import prompt_key

# keys computed before targets existed: a checkpoint of a run without targets must keep resuming
PINNED_KEYS = {
    "e0d96bbbbbb9b4966794ec4c": Prompt(1, 1, "The capital of France is"),
    "c8d540790061e5896b07fb67": Prompt("a", 3, messages=[{"role": "user", "content": "Bonjour ✓"}]),
}


def test_prompt_key_without_targets_is_unchanged():
    for key, prompt in PINNED_KEYS.items():
        assert prompt_key(prompt) == key
