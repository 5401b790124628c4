"""The lab inside a kernel with ESP: run one or more planned labs, one after another, in one boot.

Run as root inside the lab kernel (or on a host whose kernel has ESP):
    python3 -m lab.inner PLAN.json RESULTS_DIR [PLAN.json RESULTS_DIR ...]
It prints progress lines (`@@ phase k/N`) for the host side and writes RESULTS_DIR/result.json
for each plan. The exit code is 0 only when every lab passed.
"""
from __future__ import annotations

import sys
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


def main(argv: list[str]) -> int:
    ok = True
    for plan_path, results in zip(argv[0::2], argv[1::2], strict=True):
        log(f"@lab {Path(results).name}")
        ok &= run_one(LabPlan.read(Path(plan_path)), Path(results)).ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
