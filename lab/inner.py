"""The lab inside a kernel with ESP: run one or more planned labs in one boot.

Run as root inside the lab kernel (or on a host whose kernel has ESP):
    python3 -m lab.inner [--jobs N] PLAN.json RESULTS_DIR [PLAN.json RESULTS_DIR ...]
It prints progress lines (`@@ phase k/N`) for the host side and writes RESULTS_DIR/result.json
for each plan. The exit code is 0 only when every lab passed.

With --jobs N (N > 1) up to N labs run at once, each in a process of its own, taken in the order
given (put the longest first); their output lines carry the lab's name. Labs share nothing in the
kernel: every namespace is named by the plan's prefix and links are made inside namespaces only
(lab/network.py) and each router has its own /run (lab/router-setup.sh). The guest has one CPU: on a
loaded machine two at once slowed the change lab 2.4x and rotation 5x (docs/lab.md), so the suite
runs one at a time unless WAN_TEST_LAB_JOBS says otherwise.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from .contracts import LabPlan, LabResult
from .engine import Lab
from .proc import log, scrub


def run_one(plan: LabPlan, results: Path) -> LabResult:
    results.mkdir(parents=True, exist_ok=True)
    lab = Lab(plan, results)
    result = lab.result
    try:
        result = lab.run()
        if plan.hold:
            result.write(results / "result.json")
            lab.hold(Path(plan.hold))
    except Exception as e:  # the host side reports it; the kernel must still power off cleanly
        result.error = scrub(f"{type(e).__name__}: {e}")
        result.ok = False
        log(f"ERROR {result.error}")
        try:
            lab.diagnostics(set(lab.routers))
        except Exception as d:  # noqa: BLE001
            log(f"diagnostics failed too: {d}")
    finally:
        lab.teardown()
    result.write(results / "result.json")
    return result


def _name(results: str) -> str:
    """The lab's name for log lines: its results directory (RESULTS/inner: the parent's name)."""
    p = Path(results)
    return p.parent.name if p.name == "inner" else p.name


def _relay(proc: subprocess.Popen, name: str, lock: threading.Lock) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        with lock:
            sys.stdout.write(f"[{name}] {line}")
            sys.stdout.flush()


def run_many(pairs: list[tuple[str, str]], jobs: int) -> bool:
    """Each lab in a process of its own (`python -m lab.inner PLAN RESULTS`), at most `jobs` at once."""
    lock, ok = threading.Lock(), True
    running: list[tuple[subprocess.Popen, threading.Thread]] = []
    todo = list(pairs)
    while todo or running:
        while todo and len(running) < jobs:
            plan_path, results = todo.pop(0)
            log(f"@lab {_name(results)} (started; {len(todo)} waiting)")
            proc = subprocess.Popen([sys.executable, "-m", "lab.inner", plan_path, results], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1)
            relay = threading.Thread(target=_relay, args=(proc, _name(results), lock), daemon=True)
            relay.start()
            running.append((proc, relay))
        done = _wait_any([p for p, _ in running])
        for entry in [e for e in running if e[0] is done]:
            entry[1].join(5)
            running.remove(entry)
        ok &= done.returncode == 0
    return ok


def _wait_any(procs: list[subprocess.Popen]) -> subprocess.Popen:
    pid, status = os.wait()  # every child of this process is a lab it started
    for p in procs:
        if p.pid == pid:
            p.returncode = os.waitstatus_to_exitcode(status)
            return p
    return _wait_any(procs)


def main(argv: list[str]) -> int:
    jobs = 1
    if argv[:1] == ["--jobs"]:
        jobs, argv = int(argv[1]), argv[2:]
    pairs = list(zip(argv[0::2], argv[1::2], strict=True))
    if jobs > 1 and len(pairs) > 1:
        return 0 if run_many(pairs, jobs) else 1
    ok = True
    for plan_path, results in pairs:
        log(f"@lab {_name(results)}")
        ok &= run_one(LabPlan.read(Path(plan_path)), Path(results)).ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
