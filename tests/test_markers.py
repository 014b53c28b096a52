"""The tiers' rules (tests/tier_rules.py) fail what they should and pass what they should, run by
pytest's own ``pytester`` on purpose-made tests; and the session's shared fixtures are what
tests/conftest.py says they are."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import copy_tree

from m2m_ray.formats.mis import MISLayout, committed_shards
from m2m_ray.mis.synthetic import write_synthetic_mis  # noqa: F401  (imported at collection: the
from m2m_ray.sampling.pipeline import M2MPipeline  # shared fixtures' imports, charged to no test)

pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parent

# A stand-in conftest: the real rules, and server fixtures that start nothing.
CONFTEST = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import pytest
from tier_rules import (pytest_configure, pytest_runtest_call, pytest_runtest_makereport,
                        pytest_runtest_setup)

@pytest.fixture(scope="module")
def ray_local():
    yield "no Ray here"

@pytest.fixture
def s3_bucket():
    return "no server here"
"""

CASES = """
import time
import pytest

def test_quick():
    pass

def burn(seconds):  # CPU time, bounded
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass

def test_burns_cpu_unmarked():
    burn(0.6)

@pytest.mark.slow
def test_burns_cpu_marked_slow():
    burn(0.6)

def test_sleeps_unmarked():  # waiting is not CPU time: a loaded machine fails no quick test
    time.sleep(0.6)

def test_uses_ray_unmarked(ray_local):
    raise AssertionError("never runs: the rule stops it at setup")

@pytest.mark.ray
def test_uses_ray_marked(ray_local):
    assert ray_local == "no Ray here"

def test_uses_s3_unmarked(s3_bucket):
    pass

def test_calls_ray_init_unmarked():
    import ray
    with pytest.raises(RuntimeError, match="add @pytest.mark.ray"):
        ray.init(address="local", num_cpus=1)  # refused: no Ray starts
    assert not ray.is_initialized()

def test_calls_start_head_unmarked():
    import ray_head
    try:
        ray_head.start_head(num_cpus=1)
    except RuntimeError:
        pass  # a test that swallows the refusal still fails
"""


def _run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, slow_s: str | None):
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nmarkers =\n    ray: r\n    slow: s\n")
    pytester.makepyfile(test_cases=CASES)
    if slow_s is None:
        monkeypatch.delenv("M2M_TEST_SLOW_S", raising=False)
    else:
        monkeypatch.setenv("M2M_TEST_SLOW_S", slow_s)
    return pytester.runpytest("-p", "no:cacheprovider", "-rfE")


@pytest.mark.timeout(120)
def test_unmarked_slow_and_server_tests_fail_naming_the_marker(pytester, monkeypatch):
    result = _run(pytester, monkeypatch, "0.3")
    outcomes = result.parseoutcomes()
    assert (outcomes.get("passed"), outcomes.get("failed"), outcomes.get("errors")) == (4, 3, 2), \
        result.stdout.str()
    result.stdout.fnmatch_lines_random([  # each failure's whole message, then the summary
        "test_cases.py::test_burns_cpu_unmarked: its call took 0.* s of CPU > 0.3 s (M2M_TEST_SLOW_S) "
        "and it "
        "is not marked: add @pytest.mark.slow (or @pytest.mark.ray if it starts Ray or a server)*",
        "test_cases.py::test_uses_ray_unmarked uses ray_local (starts Ray or a server) but is not "
        "marked: add @pytest.mark.ray*",
        "test_cases.py::test_uses_s3_unmarked uses s3_bucket (starts Ray or a server) but is not "
        "marked: add @pytest.mark.ray*",
        "test_cases.py::test_calls_ray_init_unmarked calls ray.init (starts Ray) but is not "
        "marked: add @pytest.mark.ray*",
        "test_cases.py::test_calls_start_head_unmarked calls start_head (starts Ray) but is not "
        "marked: add @pytest.mark.ray*",
        "FAILED test_cases.py::test_burns_cpu_unmarked*", "FAILED test_cases.py::test_calls_ray_init*",
        "FAILED test_cases.py::test_calls_start_head*", "ERROR test_cases.py::test_uses_ray_unm*",
        "ERROR test_cases.py::test_uses_s3_unmarked*",
    ])
    assert "never runs" not in result.stdout.str()


@pytest.mark.timeout(120)
def test_slow_bound_is_set_by_its_variable_and_checked(pytester, monkeypatch):
    off = _run(pytester, monkeypatch, "off").parseoutcomes()
    assert (off.get("passed"), off.get("failed"), off.get("errors")) == (5, 2, 2)  # no slow rule
    default = _run(pytester, monkeypatch, None).parseoutcomes()  # 10 s: the 0.6 s burn passes
    assert (default.get("passed"), default.get("failed")) == (5, 2)
    bad = _run(pytester, monkeypatch, "ten")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*M2M_TEST_SLOW_S='ten': expected a positive number of seconds*"])


def test_shared_mis_and_model_are_what_they_say(tiny_mis, tiny_model, tmp_path):
    layout = MISLayout(tiny_mis)
    for fmt in ("parquet", "webdataset"):  # both formats of both shards committed, 2 sets each
        shards = committed_shards(tiny_mis, fmt)
        assert [stats["sets"] for _, stats in shards] == [2, 2]
        assert all(os.path.isfile(uri) for uri, _ in shards)
    index = json.loads(Path(tiny_model, "model_index.json").read_text())
    assert index == {"_class_name": "M2MPipeline", "variant": "self", "preset": "tiny"}
    assert M2MPipeline.from_pretrained(tiny_model).name == "M2M-Self"
    # a copy is the test's own: changing it leaves the shared MIS as it was
    copy = copy_tree(tiny_mis, tmp_path)
    assert copy == str(tmp_path / "mis")
    os.remove(MISLayout(copy).parquet(1))
    assert os.path.isfile(layout.parquet(1))
