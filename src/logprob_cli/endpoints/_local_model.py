"""A local Hugging Face `transformers` model as an endpoint (`model="hf:PATH"`): the reference an API is compared
against, offline and free, its answers computed from the model's own logits.

For a prompt read as token ids x (and a bias b over chosen ids, clipped to +-bias_max as the simulator does):

    z   = the model's float32 logits after x (a forward pass, float32 weights, on the CPU)
    z'  = z + b                                      (float32: the bias added to the logits, as engines do)
    lp' = log_softmax(z')                            (torch's float32 log_softmax over the whole vocabulary)

An answer reports lp' for its top-k (best first, ties by the lower id), the greedy token argmax z' with its lp',
and any chosen ids asked for; top_logprobs may be the whole vocabulary, so `direct` (and `auto`) read the exact
vector in one call, and every biased method works as on an engine.

What the model reads: a plain prompt with api="completions" is its text tokenized with the tokenizer's own special
tokens (a BOS where the tokenizer adds one, as vLLM's completions API does); with api="chat" (the default) it is
a user message (after the `system` one, if given), and `messages` are rendered by the tokenizer's chat template
with the generation prompt, then tokenized with nothing added, as a chat API does (a model without a chat
template is refused with api="chat"). A position of a completion (`Prompt.context_ids`) is the prompt's ids followed by
exactly those ids (`token_context`).

Every position of a text in one forward pass: a unit of a completion of n tokens asks for the pass over the
prompt followed by the whole completion, and its n + 1 rows of logits (the ones after the prompt and after each
completion token) are kept in a cache keyed by the exact ids read, so the other positions are answered from
it. The cache holds at most `cache_bytes` of logits (V x 4 bytes a row); a text with more rows than fit is
read in passes of R = cache_bytes // (4 V) positions each, ceil((n + 1) / R) passes in all (`forward_passes`
counts them). Rows of one pass are computed together, so a position's logits may differ from a pass over its
prefix alone in the last bits (about 1e-6 nats on SmolLM2-135M), as an engine's batched passes do.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import numpy as np

from logprob_cli.endpoints._base import (
    Answer, Endpoint, EndpointDescription, EndpointRejected, Limits, Prompt, Query, with_chosen,
)
from logprob_cli.endpoints._simulator import _top as top_indices
from logprob_cli.errors import LogprobError, Worded

HF_PREFIX = "hf:"
INSTALL_HINT = "pip install 'logprob-cli[hf]'"
CACHE_BYTES = 256 * 2**20
BIAS_MAX = 100.0
BIAS_ENTRIES = 300


class LocalModelError(LogprobError, ValueError):
    """The local model cannot be loaded (not installed, no such folder, not a model folder); the message says why."""


def load_local_model(
    name: str, api: Literal["chat", "completions"] = "chat", system: str | None = None, cache_bytes: int = CACHE_BYTES,
) -> "LocalModelEndpoint":
    """The endpoint for `name` ("hf:PATH", a folder `save_pretrained` wrote), its weights in float32 on the CPU.
    Raises LocalModelError when torch/transformers are not installed, the folder is missing or holds no model."""
    path = Path(name[len(HF_PREFIX):]).expanduser()
    try:
        torch = importlib.import_module("torch")
        transformers = importlib.import_module("transformers")
    except ImportError as error:
        raise LocalModelError(
            f"a local model ({name}) needs torch and transformers, which are not installed ({error.name} is "
            f"missing): {INSTALL_HINT}"
        ) from None
    if not path.is_dir():
        raise LocalModelError(f"{name}: there is no such folder (give hf: followed by a transformers model folder)")
    if not (path / "config.json").is_file():
        raise LocalModelError(
            f"{name}: not a transformers model folder (it has no config.json; save_pretrained writes one)"
        )
    model, tokenizer = _load(transformers, path, name)
    if api == "chat" and not getattr(tokenizer, "chat_template", None):
        raise LocalModelError(Worded(
            "{name}: its tokenizer has no chat template, so it reads no chat prompt ({api_chat} sends every prompt "
            "as one): send plain prompts with {api_completions}", name=name,
        ))
    return LocalModelEndpoint(name, path, model, tokenizer, torch, api=api, system=system, cache_bytes=cache_bytes)


def _load(transformers: Any, path: Path, name: str) -> tuple[Any, Any]:
    """The causal LM (float32, eval mode) and its tokenizer from `path`, without transformers' progress bars."""
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise LocalModelError(f"{name}: cannot be loaded as a causal language model with its tokenizer: {error}") from None
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    return model.float().eval(), tokenizer


class LocalModelEndpoint(Endpoint):
    """A `transformers` causal LM behind the `Endpoint` contract (see module docstring): in process, free, one
    answer at a time, the whole vocabulary in one call, token ids exact and counted by the model's tokenizer."""

    in_process = True
    one_call_at_a_time = True
    token_context = True
    prompt_tokens_counted = True

    def __init__(
        self, name: str, path: Path, model: Any, tokenizer: Any, torch: Any,
        api: Literal["chat", "completions"] = "chat", system: str | None = None, cache_bytes: int = CACHE_BYTES,
    ):
        self.model, self.path, self.api, self.system = name, path, api, system or None
        self.network, self.tokenizer, self.torch = model, tokenizer, torch
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.limits = Limits(self.vocab_size, BIAS_MAX, BIAS_ENTRIES, token_ids=self.vocab_size)
        self.rows_per_pass = max(1, cache_bytes // (4 * self.vocab_size))
        self.cache_bytes = cache_bytes
        self.forward_passes = 0
        self._rows: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._prompt_ids: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._lock = threading.RLock()  # asks may come from several worker threads at once

    def describe(self) -> EndpointDescription:
        return EndpointDescription(
            "hf", self.model,
            f"local transformers model {self.path} (float32 on the CPU, in process, offline, free; "
            f"{self.vocab_size:,}-token vocabulary)",
            {"path": str(self.path.resolve()), "weights": _weights_fingerprint(self.path), "api": self.api,
             "system": self.system},
            self.model,
        )

    def token_text(self, token_id: int) -> str:
        """The token decoded alone (invalid UTF-8 replaced); f"#{id}" for an id the tokenizer does not know."""
        if not 0 <= token_id < len(self.tokenizer):
            return f"#{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    async def split_text(self, text: str) -> tuple[int, ...]:
        """The tokenizer's ids for `text` alone, no special token added."""
        return await asyncio.to_thread(lambda: tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"]))

    def count_prompt_tokens(self, prompt: Prompt) -> int:
        """The ids the model reads for `prompt`: its own and its context's. ValueError where it cannot be read."""
        try:
            return len(self.prompt_ids(prompt)) + len(prompt.context_ids)
        except EndpointRejected as error:
            raise ValueError(str(error)) from None

    async def ask(self, prompt: Prompt, query: Query) -> Answer:
        """`answer` in a worker thread, so a forward pass does not block the event loop."""
        return await asyncio.to_thread(self.answer, prompt, query)

    def answer(self, prompt: Prompt, query: Query) -> Answer:
        """Answer a query synchronously (see the module docstring for the math)."""
        torch = self.torch
        ids, bias = self._checked_bias(query)
        biased = self.logits(prompt).clone()
        biased[ids] += torch.clamp(torch.tensor(bias, dtype=torch.float32), -BIAS_MAX, BIAS_MAX)
        logprobs = torch.log_softmax(biased, dim=-1).numpy()
        top = top_indices(logprobs, query.top_logprobs)
        sampled = int(top_indices(biased.numpy(), 1)[0])
        answer = Answer(
            sampled, float(logprobs[sampled]), tuple(int(i) for i in top), tuple(float(logprobs[i]) for i in top)
        )
        if not query.token_ids:
            return answer
        return with_chosen(answer, query, {i: float(logprobs[i]) for i in query.token_ids})

    def _checked_bias(self, query: Query) -> tuple[list[int], list[float]]:
        """The query's biased ids and biases; EndpointRejected for a query outside the limits."""
        self.limits.check(query, self.vocab_size)
        if not 0 <= query.top_logprobs <= self.vocab_size:
            raise EndpointRejected(f"top_logprobs must be between 0 and {self.vocab_size}, got {query.top_logprobs}")
        if len(query.bias) > BIAS_ENTRIES:
            raise EndpointRejected(f"logit_bias may have at most {BIAS_ENTRIES} entries, got {len(query.bias)}")
        ids = [i for i, _ in query.bias]
        if ids and (ids[0] < 0 or ids[-1] >= self.vocab_size):
            raise EndpointRejected(f"logit_bias has a token id outside the vocabulary [0, {self.vocab_size})")
        return ids, [b for _, b in query.bias]

    def logits(self, prompt: Prompt) -> Any:
        """The model's float32 logits (a torch tensor of V) after the prompt followed by its `context_ids`, from the
        pass over the prompt and its whole completion (or the part of it whose rows fit the cache), cached."""
        context = prompt.context_ids
        text = prompt.completion_ids if prompt.completion_ids[: len(context)] == context else context
        k = len(context)
        first = k - k % self.rows_per_pass
        last = min(first + self.rows_per_pass, len(text) + 1) - 1
        with self._lock:
            base = self.prompt_ids(prompt)
            key = (base, text[:last], first)
            rows = self._rows.get(key)
            if rows is None:
                rows = self._forward(base + text[:last], last - first + 1)
                self._keep(key, rows)
            self._rows.move_to_end(key)
        return rows[k - first]

    def _forward(self, ids: tuple[int, ...], rows: int) -> Any:
        """The last `rows` rows of the model's float32 logits over `ids`: one forward pass."""
        limit = getattr(self.network.config, "max_position_embeddings", None)
        if limit and len(ids) > limit:
            raise EndpointRejected(f"{len(ids):,} tokens do not fit the model's context of {limit:,}")
        torch = self.torch
        with torch.inference_mode():
            logits = self.network(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False).logits
        self.forward_passes += 1
        return logits[0, -rows:].float().clone()

    def _keep(self, key: tuple[Any, ...], rows: Any) -> None:
        """Cache `rows`, dropping the least recently used entries beyond `cache_bytes` (the newest always stays)."""
        self._rows[key] = rows
        total = sum(r.numel() * 4 for r in self._rows.values())
        while total > self.cache_bytes and len(self._rows) > 1:
            _, dropped = self._rows.popitem(last=False)
            total -= dropped.numel() * 4

    def prompt_ids(self, prompt: Prompt) -> tuple[int, ...]:
        """The ids the model reads for the prompt itself (see the module docstring); EndpointRejected for a chat
        prompt to a model without a chat template, or a prompt of no tokens. The last 64 are remembered."""
        content = json.dumps(prompt.content(), ensure_ascii=False)
        with self._lock:
            ids = self._prompt_ids.get(content)
            if ids is None:
                ids = self._tokenize(prompt)
                if not ids:
                    raise EndpointRejected("the prompt reads as no tokens: a forward pass needs at least one")
                if len(self._prompt_ids) >= 64:
                    self._prompt_ids.popitem(last=False)
                self._prompt_ids[content] = ids
        return ids

    def _tokenize(self, prompt: Prompt) -> tuple[int, ...]:
        """The prompt's ids: plain text with the tokenizer's special tokens (api "completions"), else its chat
        messages rendered by the chat template with the generation prompt, tokenized with nothing added."""
        if prompt.messages is None and self.api == "completions":
            return tuple(self.tokenizer(prompt.prompt)["input_ids"])
        messages = prompt.messages
        if messages is None:
            system = [{"role": "system", "content": self.system}] if self.system else []
            messages = [*system, {"role": "user", "content": prompt.prompt}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _weights_fingerprint(path: Path) -> str:
    """A digest of the folder's config.json and the names and sizes of its files: a checkpoint made with other
    weights at the same path does not resume."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update((path / "config.json").read_bytes())
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        digest.update(f"{file.name}:{file.stat().st_size};".encode())
    return digest.hexdigest()
