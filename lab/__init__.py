"""The lab: real Libreswan peers on real ESP prove every tunnel, ping and DNS forward.

Host side (`lab.run`): render, pick a kernel with ESP (host, QEMU or User-Mode Linux), boot it,
run `lab.inner` inside, show progress and the verdict. Inside (`lab.inner`): namespaces, routers,
probes, diagnostics.
"""
