"""A lab kept running for a person: lab.up starts it in the background, lab.shell runs commands in
its routers and hosts, lab.down ends it. Also lab.image (the Docker lab's router image)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from . import docker_engine, docker_image, kernels
from .run import REPO, LabRequest, run_lab
from .substrate import alive, one_lab_at_a_time


def up(sites: str, kernel: str | None, results: str | Path = "lab-results", hours: float = 4) -> int:
    """Start the lab in the background and return once it is up (or failed to come up)."""
    results = Path(results).resolve()
    pidfile = results.parent / f".{results.name}.up.pid"
    if pidfile.exists():
        print(f"a lab is already up (PID {pidfile.read_text().strip()}); lab.down first", file=sys.stderr)
        return 1
    log = results.parent / f".{results.name}.up.log"
    argv = [sys.executable, "-m", "lab.session", "--up", str(sites), kernel or "", str(results), str(hours * 3600)]
    proc = subprocess.Popen(argv,
                            cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    pidfile.write_text(f"{proc.pid}\n")
    control = results / "control"
    while proc.poll() is None and not (control / "up.json").exists():
        time.sleep(0.5)
    if proc.poll() is not None:
        pidfile.unlink(missing_ok=True)
        print(log.read_text()[-3000:], file=sys.stderr)
        print("the lab did not come up", file=sys.stderr)
        return 1
    places = json.loads((control / "up.json").read_text())["places"]
    print(f"lab up (PID {proc.pid}); results so far in {results}/result.json")
    print(f"  ./run lab.shell <place> [--cmd '...']   places: {', '.join(places)}")
    print("  ./run lab.down")
    return 0


def shell(place: str, cmd: str | None, results: str | Path = "lab-results") -> int:
    """Run commands in a router (or LAN host, DNS server, internet) of the running lab."""
    control = Path(results).resolve() / "control"
    if not (control / "up.json").exists():
        print("no lab is up: ./run lab.up first", file=sys.stderr)
        return 1

    def ask(line: str) -> int:
        name = uuid.uuid4().hex
        tmp = control / f"{name}.tmp-req"
        tmp.write_text(json.dumps({"place": place, "cmd": line}))
        tmp.rename(control / f"{name}.req")
        out = control / f"{name}.out"
        while not out.exists():
            time.sleep(0.1)
        reply = json.loads(out.read_text())
        out.unlink()
        sys.stdout.write(reply["output"])
        return reply["rc"]

    if cmd:
        return ask(cmd)
    print(f"{place}: each line runs in the lab (ip a, ip xfrm state, ipsec whack --trafficstatus, ...); Ctrl-D ends")
    while True:
        try:
            line = input(f"{place}# ")
        except EOFError:
            print()
            return 0
        if line.strip():
            ask(line)


def down(results: str | Path = "lab-results") -> int:
    """Stop the lab started by lab.up: ask it to finish, then end its process by PID if it must."""
    results = Path(results).resolve()
    pidfile = results.parent / f".{results.name}.up.pid"
    if not pidfile.exists():
        print("no lab is up")
        return 0
    pid = int(pidfile.read_text())
    (results / "control").mkdir(parents=True, exist_ok=True)
    (results / "control" / "down").write_text("down\n")
    end = time.monotonic() + 60
    while time.monotonic() < end and alive(pid):
        time.sleep(0.5)
    if alive(pid):
        os.killpg(pid, 15)  # our own background process group (start_new_session)
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it when lab.up ran in this very process (tests)
    except ChildProcessError:
        pass
    pidfile.unlink(missing_ok=True)
    print("lab down")
    return 0



def build_docker_image(base: str | None = None, engine: str | None = None) -> int:
    """`lab.image`: the router image for the Docker lab, built once per recipe (reused after)."""
    say = lambda m: print(m, flush=True)  # noqa: E731
    if engine is None:
        engine = "host" if (os.geteuid() == 0 and kernels.esp_probe_host()[0] and docker_engine.host_engine()[0]) else "guest"
    t0 = time.monotonic()
    if engine == "host":
        client, why = docker_engine.host_engine()
        if client is None:
            print(why, file=sys.stderr)
            return 1
        tag = docker_image.ensure_image(client, say, base)
    elif engine == "guest":
        if base:
            print("--base needs a registry and the host's engine (--engine host)", file=sys.stderr)
            return 2
        with one_lab_at_a_time(say):
            docker_image.ensure_data_root(say)
        tag = docker_image.image_tag()
    else:
        print(f"--engine {engine}: choose host or guest", file=sys.stderr)
        return 2
    print(f"image {tag} ready ({engine} engine; cache {docker_image.cache()}) in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--up":
    _, _, _sites, _kernel, _results, _timeout = sys.argv
    outcome = run_lab(LabRequest(sites=Path(_sites), kernel=_kernel or None, results=Path(_results), timeout=float(_timeout),
                                 hold=True))
    print(outcome.verdict())
