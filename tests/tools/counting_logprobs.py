"""Run the `logprobs` CLI with every simulator call counted in the file $CALL_LOG (one byte per call).

The byte is appended before the call is answered, straight to the kernel, so the count
survives `kill -9` and includes calls that were in flight.
"""

import os

from logprob_cli.endpoints import _simulator as simulator
from logprob_cli.cli import app

log = os.open(os.environ["CALL_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
answer = simulator.SimulatedEndpoint.answer


def counted(self, prompt, query):
    os.write(log, b".")
    return answer(self, prompt, query)


simulator.SimulatedEndpoint.answer = counted
app()
