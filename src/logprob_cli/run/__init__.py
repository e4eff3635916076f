"""run/: one batch from prompts to Parquet: probe, schedule, journal, budgets, resume, estimates.

_runner.py drives each prompt's method plan over a pool of workers and journals every answer
(_journal.py) before the plan sees it; _config.py holds the frozen `RunConfig`; _probe.py measures
an endpoint for `auto`; _estimate.py prices a batch before a call; _budget.py meters calls against
the caps; _outputs_guard.py decides which files a run may write; _progress.py counts what the runner
reports as it goes (the CLI's _display.py draws it); _targets.py resolves chosen tokens to ids;
_learning.py learns --image auto's image from the run's first whole vectors and keeps it in the checkpoint. Imports endpoints/, methods/ and io/; nothing below imports run/.
"""

from logprob_cli.run._config import RunConfig
from logprob_cli.run._estimate import Estimate, estimate_run
from logprob_cli.run._journal import JournalError, Refused
from logprob_cli.run._probe import ProbeReport, image_method, probe
from logprob_cli.run._runner import RunSummary, extract_batch
from logprob_cli.run._budget import BudgetReached, MeteredEndpoint, Spend
from logprob_cli.run._config import default_output, price_of_calls, read_batch
from logprob_cli.run._estimate import format_count, format_dollars, format_duration, in_process_latency, simulator_latency
from logprob_cli.run._outputs_guard import discard
from logprob_cli.run._prices import Price, parse_price, price_for
from logprob_cli.run._probe import PROBE_CALLS
from logprob_cli.run._progress import RunStart, Snapshot, Tally
from logprob_cli.run._runner import NoProgress, Progress
from logprob_cli.run._targets import resolve_targets
from logprob_cli.run._positions import with_completion_ids

__all__ = [
    "BudgetReached",
    "Estimate",
    "JournalError",
    "MeteredEndpoint",
    "NoProgress",
    "PROBE_CALLS",
    "Price",
    "ProbeReport",
    "Progress",
    "Refused",
    "RunStart",
    "RunConfig",
    "RunSummary",
    "Snapshot",
    "Spend",
    "Tally",
    "default_output",
    "discard",
    "estimate_run",
    "extract_batch",
    "format_count",
    "format_dollars",
    "format_duration",
    "in_process_latency",
    "parse_price",
    "price_for",
    "price_of_calls",
    "image_method",
    "probe",
    "read_batch",
    "resolve_targets",
    "simulator_latency",
    "with_completion_ids",
]
