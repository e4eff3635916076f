"""What a run does, fixed once: the method and its settings, the caps, and the batch's files.

`RunConfig` is built by the CLI from its options or by the Python API from its arguments, checked
on construction, and passed down to runner.extract_batch unchanged. `read_batch` resolves a
batch's input, shard and output the same way for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from logprob_cli.endpoints import Prompt
from logprob_cli.endpoints import SettingsError
from logprob_cli.io import read_prompts, select_shard
from logprob_cli.methods import METHODS, SPECS, Image
from logprob_cli.run._outputs_guard import check_paths
from logprob_cli.run._prices import Price, price_for
from logprob_cli.run._learning import AUTO


@dataclass(frozen=True)
class RunConfig:
    """The settings of one run: `method` (auto or a name in METHODS), `top_k` logprobs asked per call
    (lowered to the endpoint's cap), `eps` bisection's precision in nats, `concurrency` calls in flight,
    and the caps on what the checkpoint spends in all: `max_calls`, `max_cost` US$ at `price`.
    `store_vector`: with chosen tokens (or `store` top:N), also write each prompt's whole vector (NaN beyond what
    was read). `store`: "vector" (each row's whole vector) or "top:N" (the N most likely recovered tokens and the
    rest mass, io/_parquet.py; with chosen tokens, how many top entries a row keeps); N from 1 to the vocabulary
    size, which `check_store` holds it to once the endpoint is known. `image`: the model's image, which the
    image methods (topk+image, forced+image, bisection+image) need and auto uses where it is cheaper, or "auto":
    learn it from the run's first whole vectors (run/_learning.py).

    Raises ValueError on construction for a value out of range, before any call.
    """

    method: str = "auto"
    top_k: int = 20
    eps: float = 1e-3
    concurrency: int = 16
    price: Price | None = None
    max_calls: int | None = None
    max_cost: float | None = None
    store_vector: bool = False
    store: str = "vector"
    image: Image | str | None = None

    @property
    def store_top(self) -> int | None:
        """N of `store` "top:N", None for "vector"."""
        return None if self.store == "vector" else int(self.store.removeprefix("top:"))

    def check_store(self, vocab_size: int) -> None:
        """Raises SettingsError when `store` keeps more top tokens than the vocabulary holds."""
        if self.store_top is not None and self.store_top > vocab_size:
            raise SettingsError(
                "{store} {value} keeps more tokens than the vocabulary holds ({size:,}): give top:N with N at most "
                "{size:,}, or vector",
                value=self.store, size=vocab_size,
            )

    def __post_init__(self) -> None:
        if not isinstance(self.store, str) or not _is_store(self.store):
            raise SettingsError(
                '{store} must be "vector" or "top:N" with N a whole number of tokens, 1 or more, got {value!r}',
                value=self.store,
            )
        if self.method != "auto" and self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose auto or one of {', '.join(METHODS)}")
        self._check_image()
        if not _is_int(self.top_k) or self.top_k < 2:
            raise ValueError(f"top_k must be an integer, 2 or above, got {self.top_k!r}")
        if not _is_int(self.concurrency) or self.concurrency < 1:
            raise ValueError(f"concurrency must be an integer, 1 or above, got {self.concurrency!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 < self.eps < float("inf"):
            raise ValueError(f"eps must be a positive number of nats, got {self.eps!r}")
        if self.max_calls is not None and (not _is_int(self.max_calls) or self.max_calls < 0):
            raise ValueError(f"max_calls must be an integer, 0 or above, got {self.max_calls!r}")
        if self.max_cost is not None and not self.max_cost >= 0:
            raise ValueError(f"max_cost must be 0 or more US$, got {self.max_cost!r}")


    def _check_image(self) -> None:
        """Raises SettingsError where the method needs an image and none is given, an image is given to a method
        that would ignore it (auto uses one: it runs the image method where that is cheaper), or `image` is a
        string other than "auto" (learn the image from the run, run/_learning.py)."""
        needs = self.method in SPECS and SPECS[self.method].needs.image
        if isinstance(self.image, str) and self.image != AUTO:
            raise SettingsError(
                "{image} takes a file (an Image in Python) or auto (learn it from the run), got {value!r}",
                value=self.image,
            )
        if needs and self.image is None:
            raise SettingsError(
                "{method} {name} needs the model's image: give {image} auto to learn it from the run, or a file "
                "(a .npy or .npz matrix, a GGUF or safetensors model, or an earlier run's Parquet output)",
                name=self.method,
            )
        if self.image is not None and not needs and self.method != "auto":
            image_methods = ", ".join(name for name, spec in SPECS.items() if spec.needs.image)
            raise SettingsError(
                "{image} is used only by the image methods ({names}) and auto; {method} {name} would ignore it",
                names=image_methods, name=self.method,
            )


def _is_store(store: str) -> bool:
    """Whether `store` reads "vector" or "top:N" (N digits only, at least 1)."""
    count = store.removeprefix("top:")
    return store == "vector" or (count != store and count.isascii() and count.isdigit() and int(count) >= 1)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def price_of_calls(model: str | None, named_model: str, override: Price | None, max_cost: float | None) -> Price | None:
    """The price of a call: `override`, else (for a model endpoint; `model` None is the built-in simulator)
    the built-in table's. Raises SettingsError when `max_cost` is set and no price is known (`named_model`
    is the endpoint's model name, for the message)."""
    price = override if model is None else price_for(model, override)
    if max_cost is not None and price is None:
        raise SettingsError(
            "no price is known for model {name!r}: give {price} PROMPT,COMPLETION (US$ per 1M tokens) to use {max_cost}",
            name=named_model,
        )
    return price


@dataclass(frozen=True)
class Batch:
    """A batch's prompts (`prompts`: this shard's; `all_prompts`: the whole input, which fixes the output's
    columns), its Parquet `output` and the `checkpoint` beside it."""

    prompts: list[Prompt]
    all_prompts: list[Prompt]
    output: Path
    checkpoint: Path


def default_output(input: str, shard: tuple[int, int] | None) -> Path:
    """NAME.parquet beside the input NAME.jsonl, NAME.shard-I-of-N.parquet for a shard."""
    suffix = f".shard-{shard[0]}-of-{shard[1]}.parquet" if shard else ".parquet"
    return Path(input).with_name(Path(input).stem + suffix)


def read_batch(input: str, output: Path, shard: tuple[int, int] | None, api: str | None) -> Batch:
    """Check the output's paths, then read and check every prompt of `input` ("-": stdin) for `api` (None: the
    simulator, which takes both shapes) and keep shard I of N (0-based; None: all).

    Raises Refused (outputs_guard.check_paths) or InputError (every problem of the input), before any call.
    """
    checkpoint = check_paths(input, output)
    all_prompts = read_prompts(input, api=api)
    prompts = select_shard(all_prompts, *shard) if shard else all_prompts
    return Batch(prompts, all_prompts, output, checkpoint)
