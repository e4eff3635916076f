"""endpoints/: turns "this prompt, this bias" into "what the server returned".

The contract (`Endpoint`, `Query`, `Answer`, `Prompt`, `Limits`) in base.py; the built-in simulator;
the OpenAI-compatible client (openai_compatible.py) over one paced, retrying transport
(transport.py, ratelimit.py); the vocabularies that map returned tokens to ids; and the factory that
builds an endpoint from `EndpointSettings`. Nothing here imports from methods/, io/ or run/.
"""

from logprob_cli.endpoints.base import (
    Answer, Endpoint, EndpointDescription, EndpointError, EndpointFatal, EndpointRejected, EndpointUnsuitable, Limits,
    Prompt, Query,
)
from logprob_cli.endpoints.factory import EndpointSettings, SettingsError, build_endpoint
from logprob_cli.endpoints.openai_compatible import OpenAIEndpoint
from logprob_cli.endpoints.ratelimit import RateLimiter
from logprob_cli.endpoints.simulator import SimulatedEndpoint, SimulatorConfig

__all__ = [
    "Answer", "Endpoint", "EndpointDescription", "EndpointError", "EndpointFatal", "EndpointRejected",
    "EndpointSettings", "EndpointUnsuitable", "Limits", "OpenAIEndpoint", "Prompt", "Query", "RateLimiter",
    "SettingsError", "SimulatedEndpoint", "SimulatorConfig", "build_endpoint",
]
