"""logprob-cli: full next-token distributions from APIs that only show the top-k.

    from logprob_cli import extract_logprobs
    vector = extract_logprobs("The capital of France is", method="topk")
    vector.logprobs   # numpy array, one log-probability per token id (NaN = unrecovered)
    vector.calls      # endpoint calls spent
    extract_logprobs("Is the sky green? Answer:", targets=[5000, 7]).targets   # chosen tokens, at any rank
"""

from logprob_cli.version import __version__

from logprob_cli.api import Extraction, Target, extract_file, extract_logprobs  # noqa: E402

__all__ = ["Extraction", "Target", "extract_file", "extract_logprobs", "__version__"]
