"""Problem accounting for shard reading: per-reason counters and the strict-mode error."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

logger = logging.getLogger(__name__)

OK = "ok"
"""Counter key of samples yielded intact; every other key is a problem reason."""


class SampleCounter(Counter):
    """Reason -> count of skipped samples / shard problems, plus `"ok"` for yielded samples.

    A `collections.Counter`: merge another into it with `a.update(b)`; pickles across workers.
    """

    def problems(self) -> dict[str, int]:
        """Every reason except `"ok"`, sorted by name."""
        return {k: v for k, v in sorted(self.items()) if k != OK and v}

    def summary(self) -> str:
        """One line: `"ok=N; reason=n, ..."`."""
        problems = ", ".join(f"{k}={v}" for k, v in self.problems().items())
        return f"ok={self[OK]}; " + (problems or "no problems")


class ShardError(ValueError):
    """A broken shard or sample met in strict mode; names the shard URL, key and reason."""

    def __init__(self, url: str, key: str | None, reason: str, detail: str) -> None:
        where = f"{url}" + (f", sample {key!r}" if key is not None else "")
        super().__init__(
            f"{where}: {reason}: {detail}. Repair or remove the shard, or read with "
            "strict=False to skip and count broken samples."
        )
        self.url, self.key, self.reason, self.detail = url, key, reason, detail


class ProblemSink:
    """Raises `ShardError` (strict) or counts the reason in every given counter (tolerant)."""

    def __init__(self, strict: bool, counters: Sequence[Counter]) -> None:
        self.strict = strict
        self.counters = list(counters)

    def count(self, reason: str, n: int = 1) -> None:
        for counter in self.counters:
            counter[reason] += n

    def problem(self, url: str, key: str | None, reason: str, detail: str) -> None:
        if self.strict:
            raise ShardError(url, key, reason, detail)
        logger.debug("skipping %s key=%s: %s (%s)", url, key, reason, detail)
        self.count(reason)
