"""endpoints/: turns "this prompt, this bias" into "what the server returned".

The contract (`Endpoint`, `Query`, `Answer`, `Prompt`, `Limits`) in _base.py; the built-in simulator;
a local `transformers` model (_local_model.py, "hf:PATH"); the OpenAI-compatible client (_openai_compatible.py) over one paced, retrying transport
(_transport.py, _ratelimit.py); the vocabularies that map returned tokens to ids; and the factory that
builds an endpoint from `EndpointSettings`. Nothing here imports from methods/, io/ or run/.
"""

from logprob_cli.endpoints._base import (
    Answer, Endpoint, EndpointDescription, EndpointError, EndpointFatal, EndpointRejected, EndpointUnsuitable, Limits,
    Prompt, Query, WrappingEndpoint,
)
from logprob_cli.endpoints._factory import EndpointSettings, SettingsError, build_endpoint, with_served_model
from logprob_cli.endpoints._local_model import HF_PREFIX, LocalModelEndpoint
from logprob_cli.endpoints._openai_compatible import OpenAIEndpoint
from logprob_cli.endpoints._ratelimit import RateLimiter
from logprob_cli.endpoints._simulator import SimulatedEndpoint, SimulatorConfig
from logprob_cli.endpoints._base import AskFunction, Pressure
from logprob_cli.endpoints._simulator import simulator_split, simulator_token_bytes
from logprob_cli.endpoints._urls import redact
from logprob_cli.endpoints._vocabulary import Vocabulary, VocabularyError, load_vocabulary

__all__ = [
    "Answer",
    "AskFunction",
    "Endpoint",
    "EndpointDescription",
    "EndpointError",
    "EndpointFatal",
    "EndpointRejected",
    "EndpointSettings",
    "EndpointUnsuitable",
    "HF_PREFIX",
    "Limits",
    "LocalModelEndpoint",
    "OpenAIEndpoint",
    "Pressure",
    "Prompt",
    "Query",
    "RateLimiter",
    "SettingsError",
    "SimulatedEndpoint",
    "SimulatorConfig",
    "Vocabulary",
    "VocabularyError",
    "load_vocabulary",
    "WrappingEndpoint",
    "build_endpoint",
    "with_served_model",
    "redact",
    "simulator_split",
    "simulator_token_bytes",
]
