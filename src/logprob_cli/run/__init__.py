"""run/: one batch from prompts to Parquet: probe, schedule, journal, budgets, resume, estimates.

runner.py drives each prompt's method plan over a pool of workers and journals every answer
(journal.py) before the plan sees it; config.py holds the frozen `RunConfig`; probe.py measures
an endpoint for `auto`; estimate.py prices a batch before a call; budget.py meters calls against
the caps; outputs_guard.py decides which files a run may write; progress.py is what the runner
reports as it goes. Imports endpoints/, methods/ and io/; nothing below imports run/.
"""

from logprob_cli.run.config import RunConfig
from logprob_cli.run.estimate import estimate_run
from logprob_cli.run.journal import JournalError, Refused
from logprob_cli.run.probe import ProbeReport, probe
from logprob_cli.run.runner import RunSummary, extract_batch

__all__ = ["JournalError", "ProbeReport", "Refused", "RunConfig", "RunSummary", "estimate_run", "extract_batch", "probe"]
