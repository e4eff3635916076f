"""`--image auto` in a run: the model's image learned from the run's own whole vectors, kept in the checkpoint.

The first prompts run the base method (topk, forced or bisection) over the whole vocabulary, their targets
aside: whole vectors, the rows of a plain run. Each finished one is read back as the checkpoint stored it and
given to methods._image.Learner in the order they finished; once the image is ready, prompts started after it
run the image method, and a vector the image does not fit is read whole by the base method (Context's
whole_fallback), so every row is a whole vector and none comes from a wrong image. Prompts in flight at the
switch finish with the base method.

Resume: the checkpoint's meta "image_learned" lists the prompts whose vectors made the image, in order, so a
resumed run rebuilds the same image from their stored vectors (Learner's basis depends only on them); "image
plan:KEY" marks each prompt started with the image, so an unfinished prompt continues with the plan its saved
answers belong to (one started with the base method has answers and no mark). Before the image is ready, a
resumed run feeds the finished rows in input order, as finished prompts.
"""

from __future__ import annotations

from typing import Any

from logprob_cli.errors import Worded
from logprob_cli.methods import Image, Learner
from logprob_cli.run._journal import Journal, JournalError

LEARNED = "image_learned"
PLAN_MARK = "image plan:"
AUTO = "auto"  # RunConfig.image for --image auto


class LearnedImage:
    """The image of one run's --image auto (module doc), rebuilt from the checkpoint on construction."""

    def __init__(self, journal: Journal, vocab_size: int, finished_in_order: list[str]):
        """`finished_in_order`: the keys of this run's prompts the checkpoint holds results for, in input order.
        Raises JournalError where the checkpoint's learned image cannot be rebuilt from its rows."""
        self.journal = journal
        self.learner = Learner(vocab_size)
        self.keys: list[str] = []
        self.image: Image | None = None
        saved = journal.get_meta(LEARNED)
        for key in saved["prompts"] if saved else finished_in_order:
            self.finished(key, record=False)
            if self.image is not None:
                break
        if saved and (self.image is None or self.keys != saved["prompts"] or self.image.rank != saved["rank"]):
            raise JournalError(Worded(
                "the checkpoint {path} records an image learned from {count} prompts that their stored rows do not "
                "rebuild (made by another version of logprobs, or on another machine?); add {fresh} to start over",
                path=journal.path, count=len(saved["prompts"]),
            ))
        if self.image is not None and not saved:
            self._record(self.image)

    def wanted(self) -> int | None:
        """The whole vectors still needed if no more of them adds a direction (Learner.wanted); None once the image
        is learned."""
        return None if self.image is not None else self.learner.wanted()

    def image_for(self, key: str, has_answers: bool) -> Image | None:
        """The image prompt `key` runs with, None for the base method: the image once learned, for a prompt
        started with it before (marked) or starting now (marked here, before its first call); the base method
        for a prompt whose saved answers it made."""
        if self.image is None:
            return None
        if self.journal.get_meta(PLAN_MARK + key):
            return self.image
        if has_answers:
            return None
        self.journal.set_meta(PLAN_MARK + key, True)
        return self.image

    def finished(self, key: str, record: bool = True) -> None:
        """A prompt run with the base method finished: learn from its stored vector while the image is not ready
        (a vector with an unrecovered token teaches nothing), and record the image once it is."""
        if self.image is not None:
            return
        saved = self.journal.result(key)
        if saved is None or not Learner.usable(saved.result.logprobs):
            return
        self.keys.append(key)
        source = f"learned from this run's first {len(self.keys)} whole vectors"
        self.image = self.learner.add(saved.result.logprobs, saved.result.precision, source)
        if self.image is not None and record:
            self._record(self.image)

    def _record(self, image: Image) -> None:
        self.journal.set_meta(LEARNED, {"prompts": self.keys, "rank": image.rank, "source": image.source})


def image_metadata(settings: dict[str, Any], learned: dict[str, Any] | None) -> dict[str, Any] | None:
    """The output metadata's "image": where the image came from and its rank (None: no image). For --image auto,
    the learned image's source, rank and prompt count, or that it is not learned yet."""
    given = settings.get("image")
    if given is None or given.get("source") != AUTO:
        return given
    if learned is None:
        return {"source": AUTO, "rank": None, "learned": False}
    return {"source": learned["source"], "rank": learned["rank"], "learned": True, "prompts": len(learned["prompts"])}
