"""Endpoint settings and the one place an endpoint is built from them (the CLI and the Python API both call it).

    settings = EndpointSettings(model="gpt-4o-mini")          # or base_url=..., tokenizer=..., ...
    endpoint = build_endpoint(settings)                       # SimulatedEndpoint or OpenAIEndpoint

Errors name settings by their Python names (`post_bias is llama-server's mode: give its base_url`); the CLI
renders the same message with its flags (`--post-bias ... --base-url`) through `SettingsError.worded`.
"""

from __future__ import annotations

import dataclasses
import os

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from logprob_cli.endpoints._base import Endpoint
from logprob_cli.errors import LogprobError, Worded, message_of
from logprob_cli.endpoints._local_model import HF_PREFIX, LocalModelError, load_local_model
from logprob_cli.endpoints._openai_compatible import LLAMA_CPP_PYTHON, OPENAI_MAX_DRAWS, OpenAIEndpoint, server_facts, served_models
from logprob_cli.endpoints._ratelimit import RateLimiter
from logprob_cli.endpoints._simulator import SimulatedEndpoint, SimulatorConfig
from logprob_cli.endpoints._transport import RetryPolicy
from logprob_cli.endpoints._urls import USERINFO_REFUSED, has_userinfo, redact
from logprob_cli.endpoints._vocabulary import Vocabulary, VocabularyError, load_vocabulary, server_vocabulary

class SettingsError(LogprobError, ValueError):
    """Settings that cannot work together, found before any completion is asked (the CLI exits 2).

    `template` names settings as `{base_url}`, `{model}`...; `values` fill its other fields (text
    that may hold braces). str() uses the Python names (errors.SETTING_NAMES); `worded(names)` another
    naming, e.g. the CLI's flags.
    """

    def __init__(self, template: str, **values: Any):
        super().__init__(Worded(template, **values))


@dataclass(frozen=True)
class EndpointSettings:
    """Everything that chooses and configures an endpoint.

    No `model`: the built-in simulator answers (with `simulator`'s switches, default SimulatorConfig()); with a
    `base_url` and no `model`, the one model that server lists (with_served_model).
    A model "hf:PATH": the local `transformers` model in that folder (with `api` and `system` only).
    With a model: an OpenAI-compatible endpoint at `base_url` (default OpenAI's), its vocabulary
    from `tokenizer` (a tiktoken encoding, a .tiktoken, tokenizer.json or .gguf file, simulator:SIZE;
    default: llama-server's own size, the GGUF file llama-cpp-python's server names when it is here, else the
    model name), `api` chat or completions, `system`
    put before plain prompts, `extra_body` merged into each request, `post_bias` llama-server's
    post-sampling mode, paced under `rpm`/`tpm` (default: what the server announces), `retries`
    tries per call of `timeout` seconds each, and `max_draws` the most choices a request may draw at a temperature
    (OpenAI's `n`, which bisection uses to locate chosen tokens; None: what the endpoint declares; 1: greedy calls
    only, cheaper on short prompts, as a drawing call bills up to 128 completion tokens). The API key is never
    shown in repr.
    """

    model: str | None = None
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    api: Literal["chat", "completions"] = "chat"
    system: str | None = None
    extra_body: Mapping[str, Any] | None = None
    tokenizer: str | None = None
    post_bias: bool = False
    simulator: SimulatorConfig | None = None
    rpm: float | None = None
    tpm: float | None = None
    timeout: float = 60.0
    retries: int = 8
    max_draws: int | None = None


def build_endpoint(settings: EndpointSettings) -> Endpoint:
    """The endpoint the settings describe (see EndpointSettings).

    Raises SettingsError (a ValueError) for settings that contradict each other or a vocabulary that
    cannot be loaded or does not match the server's, and EndpointFatal when a base_url server cannot be
    reached or refuses the key (its GET /models, free, is asked to learn its dialect and vocabulary).
    """
    if settings.max_draws is not None and (isinstance(settings.max_draws, bool) or not isinstance(settings.max_draws, int)
                                           or settings.max_draws < 1):
        raise SettingsError("{max_draws} must be a whole number, 1 or more, got {value!r}", value=settings.max_draws)
    settings = with_served_model(settings)
    if settings.model is None:
        return _simulator(settings)
    if settings.simulator is not None:
        raise SettingsError("{simulator} apply to the built-in simulator, not to {model} endpoints")
    if settings.model.startswith(HF_PREFIX):
        return _local_model(settings)
    base_url = settings.base_url or os.environ.get("OPENAI_BASE_URL") or None  # the variable speaks to servers only
    if base_url and has_userinfo(base_url):
        raise SettingsError(USERINFO_REFUSED, url=redact(base_url))
    if settings.post_bias and not base_url:
        raise SettingsError("{post_bias} is llama-server's mode: give its {base_url}")
    if settings.extra_body is not None and not isinstance(settings.extra_body, Mapping):
        raise SettingsError("{extra_body} must be a JSON object")
    facts = server_facts(base_url, settings.api_key, settings.model) if base_url else {}
    if facts.get("dialect") == LLAMA_CPP_PYTHON:
        vocabulary = _text_keyed_vocabulary(settings, facts.get("served_model"))
    else:
        vocabulary = _vocabulary(settings, facts.get("n_vocab"))
    if settings.post_bias and facts.get("dialect") != "llama.cpp":
        raise SettingsError(
            "{post_bias} is llama-server's mode (post_sampling_probs), and this server is not llama-server"
        )
    return OpenAIEndpoint(
        settings.model, vocabulary, base_url=base_url, api_key=settings.api_key, api=settings.api,
        system=settings.system, extra_body=dict(settings.extra_body) if settings.extra_body is not None else None,
        dialect=facts.get("dialect", "openai"), post_bias=settings.post_bias, mixed_prompts=facts.get("mixed_prompts", False),
        draws=min(facts.get("draws", OPENAI_MAX_DRAWS), settings.max_draws or OPENAI_MAX_DRAWS),
        limiter=RateLimiter(settings.rpm, settings.tpm),
        retry=RetryPolicy(attempts=settings.retries, timeout=settings.timeout),
    )


def with_served_model(settings: EndpointSettings) -> EndpointSettings:
    """`settings` with `model` the one model its `base_url`'s server lists in GET /models (free), where a base_url
    comes without a model or simulator switches; else unchanged. SettingsError where the server lists several
    models (naming them) or none; EndpointFatal where it cannot be reached or refuses the key."""
    if settings.model is not None or not settings.base_url or settings.simulator is not None:
        return settings
    if has_userinfo(settings.base_url):
        raise SettingsError(USERINFO_REFUSED, url=redact(settings.base_url))
    models = served_models(settings.base_url, settings.api_key)
    if models is None:
        raise SettingsError(
            "{base_url} needs {model} here: {url} does not list the models it serves (GET /models); name the one to use",
            url=redact(settings.base_url),
        )
    if len(models) > 1:
        listed = ", ".join(models[:10]) + (", ..." if len(models) > 10 else "")
        raise SettingsError(
            "{base_url} needs {model} here: {url} serves {count} models ({listed}); name the one to use",
            url=redact(settings.base_url), count=len(models), listed=listed,
        )
    return dataclasses.replace(settings, model=models[0])


def _simulator(settings: EndpointSettings) -> SimulatedEndpoint:
    """The built-in simulator, refusing the settings that only a model endpoint takes."""
    if settings.base_url:
        raise SettingsError("{simulator} apply to the built-in simulator, not to a {base_url} server")
    if settings.rpm or settings.tpm:
        raise SettingsError("{rpm}/{tpm} pace a {model} endpoint; the built-in simulator has no rate limit")
    config = settings.simulator or SimulatorConfig()
    if settings.max_draws is not None:
        config = dataclasses.replace(config, max_draws=min(config.max_draws, settings.max_draws))
    return SimulatedEndpoint(config, system=settings.system)


def _local_model(settings: EndpointSettings) -> Endpoint:
    """The local model the settings name, refusing the settings that only a server takes."""
    given = [name for name in ("base_url", "api_key", "tokenizer", "post_bias", "extra_body", "rpm", "tpm")
             if getattr(settings, name)]
    if given:
        named = ", ".join("{%s}" % name for name in given)
        raise SettingsError(
            named + " apply to a server; {model} {name} is a local model read in this process", name=settings.model
        )
    try:
        return load_local_model(settings.model, api=settings.api, system=settings.system)
    except LocalModelError as error:
        message = message_of(error)
        if isinstance(message, Worded):
            raise SettingsError(message.template, **message.values) from None
        raise SettingsError("{error}", error=message) from None


def _text_keyed_vocabulary(settings: EndpointSettings, served: Any) -> Vocabulary:
    """llama-cpp-python's vocabulary: its server names tokens by text only and says nothing of its vocabulary, so
    it comes from {tokenizer}, by default the GGUF file the server names as its model when that file is here."""
    spec = settings.tokenizer
    if spec is None and isinstance(served, str) and served.endswith(".gguf") and Path(served).is_file():
        spec = served
    if spec is None:
        raise SettingsError(
            "this is llama-cpp-python's server, which names tokens by their text only and does not tell its "
            "vocabulary: give the GGUF file it loaded with {tokenizer} (it serves {served!r})", served=served,
        )
    try:
        return load_vocabulary(spec)
    except VocabularyError as error:
        raise SettingsError("{error}", error=error) from error


def _vocabulary(settings: EndpointSettings, server_size: int | None) -> Vocabulary:
    """The tokenizer's vocabulary (default: llama-server's size, else the model name's), checked against the
    size the server reports."""
    try:
        if settings.tokenizer is None and server_size is not None:
            vocabulary = server_vocabulary(server_size)
        else:
            vocabulary = load_vocabulary(settings.tokenizer or settings.model)
    except VocabularyError as error:
        hint = "" if settings.tokenizer else " (no {tokenizer} given, so the model name {model_name!r} was tried)"
        raise SettingsError("{error}" + hint, error=error, model_name=settings.model) from error
    if server_size is not None and vocabulary.size != server_size:
        raise SettingsError(
            "{tokenizer} {name} has {size:,} tokens but the server's model has {server:,}",
            name=vocabulary.name, size=vocabulary.size, server=server_size,
        )
    return vocabulary
