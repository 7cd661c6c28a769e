"""Every compose slot gets valid, distinct subnets and ports (no docker needed)."""

from __future__ import annotations

import ipaddress

import pytest

from cluster.chaos import MAX_SLOT, ChaosError, free_slot, slot_environment


def test_every_slot_has_valid_distinct_networks_and_ports() -> None:
    seen_v6, seen_v4, seen_ports = set(), set(), set()
    for slot in range(MAX_SLOT + 1):
        env = slot_environment(slot)
        v6 = ipaddress.ip_network(env["HYPERMESH_SUBNET6"])  # raises on an invalid CIDR
        v4 = ipaddress.ip_network(env["HYPERMESH_SUBNET4"])
        assert v6.version == 6 and v6.is_private and v4.version == 4 and v4.is_private
        ports = {int(v) for k, v in env.items() if "PORT_" in k}
        assert len(ports) == 14 and all(1024 < p < 65536 for p in ports)
        assert v6 not in seen_v6 and v4 not in seen_v4 and not ports & seen_ports
        seen_v6.add(v6)
        seen_v4.add(v4)
        seen_ports |= ports


@pytest.mark.parametrize("slot", [-1, MAX_SLOT + 1])
def test_slots_outside_the_range_are_refused(slot: int) -> None:
    with pytest.raises(ValueError, match="slot must be in"):
        slot_environment(slot)


def test_a_slot_whose_subnet_a_leftover_network_holds_is_passed_over() -> None:
    leftover = slot_environment(45)["HYPERMESH_SUBNET4"]  # an interrupted run's network
    assert free_slot(45, in_use=["172.17.0.0/16"]) == 45
    assert free_slot(45, in_use=[leftover, "172.17.0.0/16"]) == 46
    assert free_slot(MAX_SLOT, in_use=[slot_environment(MAX_SLOT)["HYPERMESH_SUBNET6"]]) == 0  # wraps around
    with pytest.raises(ChaosError, match="docker network prune"):
        free_slot(0, in_use=["172.30.0.0/16", "fd42:4d48::/32"])
