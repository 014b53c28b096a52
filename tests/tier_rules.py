"""The test tiers' rules, as pytest hooks (tests/conftest.py imports them; tests/test_markers.py
runs them on purpose-made tests with ``pytester``).

* A test that starts Ray or a server carries ``@pytest.mark.ray``. An unmarked test that uses one
  of ``SERVER_FIXTURES`` fails at setup, before the fixture starts anything; one that calls
  ``ray.init`` or ``ray_head.start_head`` (itself, through a fixture or through library code) has
  the call refused and fails. Each message names the marker to add.
* A test whose setup or call phase takes longer than ``M2M_TEST_SLOW_S`` seconds (default 10) of
  CPU time — this process's and that of the subprocesses it waited for (``os.times``), not wall
  time, so a loaded machine (a CI box beside other work) never fails a quick test — carries
  ``@pytest.mark.slow`` (or ``ray``); otherwise that phase fails, naming its CPU seconds and the
  marker. ``M2M_TEST_SLOW_S=off`` turns this check off.

So ``pytest -m "not slow and not ray"`` (the inner loop) holds only quick, server-free tests.
"""

from __future__ import annotations

import os

import pytest

SERVER_FIXTURES = ("ray_local", "ray_head", "s3_server", "s3_bucket")
SLOW_ENV = "M2M_TEST_SLOW_S"
DEFAULT_SLOW_S = 10.0
_SLOW_KEY = pytest.StashKey[object]()  # the bound in seconds, or None when off
_STARTED = pytest.StashKey[list]()  # what an unmarked test tried to start, by name
_CPU_S = pytest.StashKey[dict]()  # CPU seconds of each phase ("setup", "call") of a test


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its waited-for children so far."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _timed(item: pytest.Item, when: str):
    """Context of one phase: stores its CPU seconds in the item's stash."""
    class Timer:
        def __enter__(self):
            self.start = cpu_seconds()

        def __exit__(self, *exc):
            item.stash.setdefault(_CPU_S, {})[when] = cpu_seconds() - self.start
    return Timer()


def slow_bound_s(value: str | None) -> float | None:
    """The slow-test bound in seconds from ``M2M_TEST_SLOW_S``'s value; ``None`` for ``off``.
    Raises ``pytest.UsageError`` naming the variable for anything else than a positive number."""
    if value is None or not value.strip():
        return DEFAULT_SLOW_S
    if value.strip().lower() == "off":
        return None
    try:
        bound = float(value)
    except ValueError:
        bound = float("nan")
    if not bound > 0:
        raise pytest.UsageError(f"{SLOW_ENV}={value!r}: expected a positive number of seconds "
                                f"(default {DEFAULT_SLOW_S:g}) or 'off'")
    return bound


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_SLOW_KEY] = slow_bound_s(os.environ.get(SLOW_ENV))
    import ray  # noqa: F401  (for _refuse_starts, imported once here; ~0.3 s)


def _marked(item: pytest.Item, *names: str) -> bool:
    return any(item.get_closest_marker(name) is not None for name in names)


def _add_ray(item: pytest.Item, what: str) -> str:
    return (f"{item.nodeid} {what} but is not marked: add @pytest.mark.ray "
            f"(tests/tier_rules.py)")


def _refuse_starts(item: pytest.Item, monkeypatch: pytest.MonkeyPatch) -> None:
    """``ray.init`` and ``ray_head.start_head`` raise (and are noted) in an unmarked test."""
    import ray
    import ray_head

    started = item.stash.setdefault(_STARTED, [])

    def refusal(name: str):
        def refused(*args, **kwargs):
            started.append(name)
            raise RuntimeError(_add_ray(item, f"calls {name} (starts Ray)"))
        return refused

    monkeypatch.setattr(ray, "init", refusal("ray.init"))
    monkeypatch.setattr(ray_head, "start_head", refusal("start_head"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    if _marked(item, "ray"):
        return (yield)
    used = [name for name in SERVER_FIXTURES if name in item.fixturenames]
    if used:  # before the fixtures run: nothing is started
        pytest.fail(_add_ray(item, f"uses {', '.join(used)} (starts Ray or a server)"),
                    pytrace=False)
    with pytest.MonkeyPatch.context() as monkeypatch, _timed(item, "setup"):
        _refuse_starts(item, monkeypatch)
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    if _marked(item, "ray"):
        return (yield)
    with pytest.MonkeyPatch.context() as monkeypatch, _timed(item, "call"):
        _refuse_starts(item, monkeypatch)
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """The setup or call report of a test that broke a rule becomes a failure saying which."""
    report = yield
    if report.when not in ("setup", "call") or _marked(item, "ray"):
        return report
    started = item.stash.get(_STARTED, [])
    if started:  # also when the test or the library caught the refusal
        report.outcome = "failed"
        report.longrepr = _add_ray(item, f"calls {', '.join(sorted(set(started)))} (starts Ray)")
        started.clear()
        return report
    bound = item.config.stash[_SLOW_KEY]
    cpu_s = item.stash.get(_CPU_S, {}).get(report.when, 0.0)
    if bound is not None and report.passed and cpu_s > bound and not _marked(item, "slow"):
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid}: its {report.when} took {cpu_s:.1f} s of CPU > {bound:g} s "
            f"({SLOW_ENV}) and it is not marked: add @pytest.mark.slow (or @pytest.mark.ray if it "
            f"starts Ray or a server), or make it faster (tests/tier_rules.py)")
    return report
