"""Shared fixtures: one small Ed25519 cluster (keys and manifest only, no processes)."""

from __future__ import annotations

import pytest

from cluster.bootstrap import InitOptions, init_cluster
from cluster.manifest import Manifest


@pytest.fixture(scope="session")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return init_cluster(tmp_path_factory.mktemp("c") / "cluster", InitOptions(nodes=4, signing_scheme="Ed25519"))
