"""Live progress of a long job (building MIS, generating): counts done of the total, rate, ETA and
failures, shown three ways from one set of figures:

- a line on stdout every ``interval_s`` (``[build_mis] shards 3/12 · sets 12/48 · images
  300/1200 (25.0%) · 4.1 images/s · ETA 03:40 · failures 0``) when stderr is not a terminal — what
  ``ray job logs -f`` shows;
- a tqdm bar on an interactive terminal instead of the lines;
- ``progress.json`` beside the job's output, rewritten atomically (``storage.write_bytes``: a
  rename locally, one PUT on S3) at most every ``interval_s`` and at the end, for an operator or a
  dashboard to read while the job runs. The job's final stats carry the same final figures.

``progress.json`` (all counts are ints, times in seconds)::

    {"job": "build_mis", "state": "running" | "done" | "failed", "unit": "images",
     "done": {"shards": 3, "sets": 12, "images": 300}, "total": {...same keys...},
     "fraction": 0.25, "failures": 0, "last_failure": null,
     "rate_per_s": {"shards": 0.04, ...}, "eta_s": 220.0, "elapsed_s": 73.2,
     "started_at": "2026-11-30T07:00:00+00:00", "updated_at": "..."}

``done`` includes work committed by earlier runs of a resumed job (``done_before``); the rates
and the ETA count only this run's work. The ETA uses ``unit`` (the finest count).
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from typing import Any

from tqdm import tqdm

from m2m_ray import storage


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class JobProgress:
    """Counts of one job run: ``update(sets=4, images=100)`` as work completes, ``failure(why)``
    as it fails, ``finish()`` at the end (returns the final figures, also written).

    ``total``: the count of each unit the whole job has (``{"shards": 12, "sets": 48, ...}``;
    None where the job cannot know it cheaply: no fraction and no ETA then);
    ``done_before``: what earlier runs already did (same keys, default 0); ``unit``: the key the
    rate and ETA are about. Raises ``ValueError`` for a ``unit`` or ``done_before`` key missing
    from ``total``.
    """

    def __init__(self, job: str, uri: str, total: dict[str, int | None], unit: str,
                 interval_s: float = 30.0, done_before: dict[str, int] | None = None,
                 storage_cfg: "storage.StorageConfig | None" = None, stream=None):
        if unit not in total:
            raise ValueError(f"progress unit {unit!r} is not one of the totals {sorted(total)}")
        done_before = done_before or {}
        unknown = sorted(set(done_before) - set(total))
        if unknown:
            raise ValueError(f"done_before has keys {unknown} that are not totals {sorted(total)}")
        self.job, self.uri, self.unit, self.interval_s = job, uri, unit, interval_s
        self.total = {key: None if value is None else int(value) for key, value in total.items()}
        self.before = {key: int(done_before.get(key, 0)) for key in total}
        self.this_run = dict.fromkeys(total, 0)
        self.failures, self.last_failure = 0, None
        self.storage_cfg = storage_cfg
        self.started, self.started_at = time.perf_counter(), _now_iso()
        self.last_emit = float("-inf")
        self.stream = stream or sys.stdout
        # On a terminal a bar replaces the interval lines (Ray job logs are not terminals).
        self.bar = (tqdm(total=self.total[unit], initial=self.before[unit], desc=job, unit=unit,
                         dynamic_ncols=True) if sys.stderr.isatty() else None)
        self.emit(force=True)

    # --- updates -----------------------------------------------------------------------------

    def update(self, **done: int) -> None:
        """Add work finished just now, e.g. ``update(shards=1, sets=4, images=100)``."""
        unknown = sorted(set(done) - set(self.total))
        if unknown:
            raise ValueError(f"progress update of {unknown}: the job counts {sorted(self.total)}")
        for key, value in done.items():
            self.this_run[key] += int(value)
        if self.bar is not None:
            self.bar.update(int(done.get(self.unit, 0)))
        self.emit()

    def failure(self, reason: str, count: int = 1) -> None:
        """Count ``count`` failures (a failed round, a skipped set) and keep the latest reason."""
        self.failures += count
        self.last_failure = reason
        self.emit()

    def finish(self, state: str = "done") -> dict[str, Any]:
        """Write the final figures (``state``: ``done`` or ``failed``) and return them."""
        figures = self.emit(force=True, state=state)
        if self.bar is not None:
            self.bar.close()
        return figures

    # --- figures -----------------------------------------------------------------------------

    def figures(self, state: str = "running") -> dict[str, Any]:
        elapsed = time.perf_counter() - self.started
        done = {key: self.before[key] + self.this_run[key] for key in self.total}
        rate = {key: round(value / elapsed, 4) if elapsed > 0 else 0.0
                for key, value in self.this_run.items()}
        total_unit = self.total[self.unit]
        left = None if total_unit is None else total_unit - done[self.unit]
        eta = (None if left is None else 0.0 if left <= 0
               else round(left / rate[self.unit], 1) if rate[self.unit] > 0 else None)
        fraction = (None if total_unit is None
                    else round(done[self.unit] / total_unit, 4) if total_unit else 1.0)
        return {"job": self.job, "state": state, "unit": self.unit, "done": done,
                "total": dict(self.total), "fraction": fraction,
                "failures": self.failures, "last_failure": self.last_failure,
                "rate_per_s": rate, "eta_s": eta, "elapsed_s": round(elapsed, 1),
                "started_at": self.started_at, "updated_at": _now_iso()}

    def emit(self, force: bool = False, state: str = "running") -> dict[str, Any] | None:
        """Write ``progress.json`` and the line (or the bar's postfix) if ``interval_s`` passed
        since the last time, or ``force``. Returns the figures written, else None."""
        now = time.perf_counter()
        if not force and now - self.last_emit < self.interval_s:
            return None
        self.last_emit = now
        figures = self.figures(state)
        storage.write_bytes(self.uri, json.dumps(figures, indent=2).encode(), self.storage_cfg)
        if self.bar is not None:
            self.bar.set_postfix(failures=self.failures, refresh=True)
        else:
            print(progress_line(figures), file=self.stream, flush=True)
        return figures


def progress_line(figures: dict[str, Any]) -> str:
    """``[job] shards 3/12 · sets 12/48 · images 300/1200 (25.0%) · 4.1 images/s · ETA 03:40 ·
    failures 0`` (the percentage and the ETA are about ``unit``; ETA ``?`` before any rate)."""
    done, total, unit = figures["done"], figures["total"], figures["unit"]
    fraction = figures["fraction"]
    counts = [f"{key} {done[key]}/{'?' if total[key] is None else total[key]}"
              + (f" ({100 * fraction:.1f}%)" if key == unit and fraction is not None else "")
              for key in total]
    eta = figures["eta_s"]
    parts = [*counts, f"{figures['rate_per_s'][unit]:.3g} {unit}/s",
             "ETA " + ("?" if eta is None else tqdm.format_interval(eta)),
             f"failures {figures['failures']}"]
    state = "" if figures["state"] == "running" else f" {figures['state']}"
    return f"[{figures['job']}{state}] " + " · ".join(parts)
