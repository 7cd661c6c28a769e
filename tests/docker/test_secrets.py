"""In the compose cluster each validator can read its own keys and the public files,
never another validator's keys nor the CA key: one broken container must not be able
to sign as 2f+1 validators (docs/OPERATIONS.md §2)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.docker]


def test_a_validator_reads_only_its_own_secrets(make_cluster):
    cluster = make_cluster()
    node2 = cluster.container("node-2")

    def can_read(path: str) -> bool:  # as the container's own user (uid 10001), not root
        return node2.exec_run(["cat", path]).exit_code == 0

    assert can_read("/cluster/manifest.json") and can_read("/cluster/ca.pem")
    assert can_read("/cluster/nodes/node-2/signing.json") and can_read("/cluster/nodes/node-2/tls.key")
    for secret in ("/cluster/nodes/node-1/signing.json", "/cluster/nodes/node-3/tls.key",
                   "/cluster/nodes/node-4/cluster-kem.json", "/cluster/ca.key"):
        assert not can_read(secret), f"node-2 can read {secret}"
