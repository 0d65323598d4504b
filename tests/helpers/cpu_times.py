"""``pytest --cpu-times N``: the N tests that took the most CPU, and the suite's total.

With 2 cores shared by 2 xdist workers and the training runs they launch, a test's wall time
(``--durations``) mostly says what else ran beside it. Its CPU time says what it costs: this
process's user + system time over the test (setup, call and teardown) plus that of every
descendant process reaped meanwhile (torchrun, its ranks, their dataloader workers), from
``getrusage`` (a forkserver helper, orphaned when its rank exits, is not counted), and that of
every rank forked for it by the zygote (``tests/helpers/zygote.py``: not a descendant, so the
zygote reports each rank's CPU time when it ends). Each xdist worker measures its own tests and sends the numbers back with the
reports; the controller prints the table.
"""

from __future__ import annotations

import resource
from collections import defaultdict

import pytest

from tests.helpers import zygote

_PROPERTY = "cpu_seconds"
_START = pytest.StashKey[float]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cpu-times", type=int, default=None, metavar="N",
        help="print the N tests with the most CPU time (their own and their child processes'); 0 prints them all",
    )


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime + zygote.forked_cpu_seconds


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):  # noqa: ANN201 - a hook wrapper
    item.stash[_START] = _cpu_seconds()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # noqa: ANN201 - a hook wrapper
    outcome = yield
    report = outcome.get_result()
    if report.when == "teardown" and _START in item.stash:
        report.user_properties.append((_PROPERTY, _cpu_seconds() - item.stash[_START]))


class _Table:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for name, value in report.user_properties:
            if name == _PROPERTY:
                self.seconds[report.nodeid] += value

    def pytest_terminal_summary(self, terminalreporter, config: pytest.Config) -> None:  # noqa: ANN001 - pytest's
        limit = config.getoption("--cpu-times")
        ranked = sorted(self.seconds.items(), key=lambda item: -item[1])
        shown = ranked if limit == 0 else ranked[:limit]
        terminalreporter.write_sep("=", f"CPU time of the {len(shown)} costliest tests (own + child processes)")
        for nodeid, seconds in shown:
            terminalreporter.write_line(f"{seconds:8.1f} s  {nodeid}")
        per_file: dict[str, float] = defaultdict(float)
        for nodeid, seconds in ranked:
            per_file[nodeid.split("::")[0]] += seconds
        terminalreporter.write_sep("-", "per file")
        for path, seconds in sorted(per_file.items(), key=lambda item: -item[1]):
            terminalreporter.write_line(f"{seconds:8.1f} s  {path}")
        terminalreporter.write_line(f"total: {sum(self.seconds.values()):.0f} CPU-s over {len(ranked)} tests")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--cpu-times") is not None and not hasattr(config, "workerinput"):
        config.pluginmanager.register(_Table(), "cpu_times_table")
