"""The suite's shared lab boots (`uml_labs`, `qemu_labs`) in a process of their own, started by the
session's first test, while the tests that boot no kernel run (tests/lab/conftest.py orders every
lab test last): a CI machine's two cores do both at once. Still one kernel at a time: the process
holds the machine's lab lock, and every lab test waits for the process to end before it starts
(so `probed`, the kernel tests and the Docker lab boot only after it).

The process is forked, so the requests (with their tamper functions) need no pickling; it writes
its outcomes to a pickle and its progress lines to labs.log beside the results (its stdout and
stderr too: pytest captures the parent's). A session that ends first (-x, ^C) interrupts it by its
PID (SIGINT: run_labs kills its kernel and cleans up, tests/lab/test_kernels.py proves that) and
waits for it. WAN_TEST_LABS_SERIAL=1 runs each set inline when its fixture is first used (as before).
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import pickle
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

Builder = Callable[[Path, Path], dict]  # (results base, revisions dir) -> {name: LabRequest}


def _child(builders: dict[str, tuple[Builder, Path, Path]], jobs: dict[str, int], out: Path, log: Path) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (the process's own streams)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from lab.run import run_labs

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    from lab.substrate import one_lab_at_a_time
    with one_lab_at_a_time(say):  # across every boot: no other lab slips in between UML's and QEMU's
        _boots(builders, jobs, out, say, run_labs)


def _boots(builders, jobs, out, say, run_labs) -> None:
    for kind, (build, base, revisions) in builders.items():  # UML first: QEMU last, on a quieter machine
        t0 = time.monotonic()
        try:
            reqs = {name: dataclasses.replace(r, on_line=say) for name, r in build(base, revisions).items()}
            outcome: object = dict(zip(reqs, run_labs(list(reqs.values()), jobs=jobs.get(kind, 1)), strict=True))
        except BaseException as e:  # noqa: BLE001 (the fixture raises it again in the test)
            outcome = RuntimeError(f"{kind} labs failed to run: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            if isinstance(e, KeyboardInterrupt):
                (out / f"{kind}.pickle").write_bytes(pickle.dumps(outcome))
                raise
        say(f"suite labs: {kind}: {time.monotonic() - t0:.1f} s")
        (out / f"{kind}.pickle.new").write_bytes(pickle.dumps(outcome))
        (out / f"{kind}.pickle.new").rename(out / f"{kind}.pickle")


class SuiteLabs:
    def __init__(self, builders: dict[str, Builder], jobs: dict[str, int] | None = None):
        self.builders = builders
        self.jobs = jobs or {}
        self.proc: multiprocessing.process.BaseProcess | None = None
        self.out: Path | None = None
        self.log: Path | None = None
        self.started: set[str] = set()

    def start(self, kinds: list[str], tmp_path_factory) -> None:
        if self.proc is not None or not kinds or os.environ.get("WAN_TEST_LABS_SERIAL"):
            return
        self.out = tmp_path_factory.mktemp("suite-labs")
        self.log = self.out / "labs.log"
        work = {k: (self.builders[k], tmp_path_factory.mktemp(f"{k}-labs"), tmp_path_factory.mktemp(f"{k}-revisions"))
                for k in kinds}
        self.proc = multiprocessing.get_context("fork").Process(target=_child, args=(work, self.jobs, self.out, self.log),
                                                                name="suite-labs")
        self.proc.start()
        self.started = set(kinds)
        # the labs are the suite's critical path (a lab kernel's one CPU: every process it starts is
        # compute), the tests that boot nothing are not: they yield the CPU to the lab process (forked
        # above, it keeps its priority). WAN_TEST_NICE=0 keeps them equal.
        os.nice(int(os.environ.get("WAN_TEST_NICE", "10")))
        print(f"\nsuite labs: {', '.join(kinds)} started in the background (pid {self.proc.pid}); progress in {self.log}",
              file=sys.__stderr__, flush=True)

    def wait(self) -> None:
        """Until the process has ended (every kernel it booted is gone)."""
        if self.proc is not None and self.proc.is_alive():
            self.proc.join()

    def outcomes(self, kind: str, tmp_path_factory) -> dict:
        if kind not in self.started:  # serial, or a fixture nobody announced: inline, as it always was
            from lab.run import run_labs
            reqs = self.builders[kind](tmp_path_factory.mktemp(f"{kind}-labs"), tmp_path_factory.mktemp(f"{kind}-revisions"))
            return dict(zip(reqs, run_labs(list(reqs.values()), jobs=self.jobs.get(kind, 1)), strict=True))
        self.wait()
        assert self.out is not None
        p = self.out / f"{kind}.pickle"
        if not p.exists():
            raise RuntimeError(f"the background lab process ended (exit {self.proc.exitcode}) without the {kind} "
                               f"labs' outcomes; see {self.log}")
        got = pickle.loads(p.read_bytes())
        if isinstance(got, BaseException):
            raise got
        return got

    def stop(self) -> None:
        """The session is over: a process still running is interrupted (by its PID) and waited for."""
        if self.proc is None or not self.proc.is_alive():
            return
        print(f"suite labs: interrupting the background labs (pid {self.proc.pid})", file=sys.__stderr__, flush=True)
        os.kill(self.proc.pid, signal.SIGINT)
        self.proc.join(180)
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.join(30)
