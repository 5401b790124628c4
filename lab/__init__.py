"""The lab: real Libreswan peers on real ESP prove every tunnel, ping and DNS forward.

Host side: `lab.run.run_lab(LabRequest)` renders, lets the scenarios prepare, picks a kernel with
ESP (lab.substrate), boots it (lab.kernels) and runs `lab.inner` inside; lab.console draws the
verdict. Inside: the engine (lab.engine) with its network, router hosts, proofs, diagnostics and
scenarios (lab/scenarios/). docs/lab.md has the layout and the plan/result documents.
"""
