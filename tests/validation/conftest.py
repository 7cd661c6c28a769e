"""Shared, session-scoped material: key generation and storage commitments are the
slow parts of making proofs, so each is made once."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from consensus.crypto import kem_scheme
from consensus.proofs.params import ValidationParams
from consensus.prover import HolderKeys, StorageCommitment

NOW = 1_700_000_000_000  # agreed consensus time used by most tests


@dataclass(frozen=True)
class Cluster:
    params: ValidationParams
    kem_private: bytes
    storage: StorageCommitment


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    public, private = kem_scheme("ML-KEM-1024").generate()
    params = ValidationParams(kem_public_key=public, min_space_bytes=64 * 1024)
    return Cluster(params, private, StorageCommitment.generate(params.min_space_bytes, 1024))


@pytest.fixture(scope="session")
def falcon() -> HolderKeys:
    return HolderKeys.generate("FALCON-1024")


@pytest.fixture(scope="session")
def mldsa() -> HolderKeys:
    return HolderKeys.generate("ML-DSA-44")
