"""What the QEMU lab tests assert of the EL routers that ran real firewalld (lab/firewalld.py)."""
from __future__ import annotations


def assert_firewalld(outcome, routers: set[str], full: str) -> None:
    """These EL routers ran real firewalld (lab/firewalld.py) and passed its check; `full` was also
    reloaded and rebooted, with IPv6 ND, an RA answering the LAN host's solicitation, SSH from the
    internet, the port forward and (a router-DNS site) a DHCP DISCOVER from 0.0.0.0 answered each time."""
    r = outcome.result
    assert {n for n, what in r.firewalls.items() if what.startswith("firewalld 1.3.3 (real")} == routers
    fw = {c.src: c for c in r.checks if c.kind == "firewalld"}
    assert set(fw) == routers and all(c.ok for c in fw.values()), [c.evidence.get("why") for c in fw.values()]
    assert [n for n, c in fw.items() if c.evidence["full"]] == [full]
    phases = fw[full].evidence
    want = {"ipv6_nd", "ipv6_ra", "ssh_management", "dnat_port_forward"} | ({"dhcp_discover"} if phases["router_dns"] else set())
    for when in ("boot", "reload", "reboot"):
        assert phases[when]["state"] == "running" and phases[when]["active_zones"]["wan-tunnels"]["sources"]
        assert {k for k, v in phases[when]["platform"].items() if v["ok"]} == want, phases[when]["platform"]


def if_firewalld(outcome, routers: set[str], full: str) -> None:
    """A lab that may run real firewalld or keep the model (LabRequest.firewalld=False: real firewalld
    costs minutes of CI per lab): either these routers ran firewalld and passed its check, or the
    verdict names the lab's model for each and no firewalld check ran."""
    r = outcome.result
    if any(what.startswith("firewalld") for what in r.firewalls.values()):
        assert_firewalld(outcome, routers, full)
    else:
        assert all(r.firewalls[n].startswith("the lab's model of EL's firewall") for n in routers), r.firewalls
        assert not [c for c in r.checks if c.kind == "firewalld"]
