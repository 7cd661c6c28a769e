"""Ready-made request payloads for load generators, integration and chaos tests.

Each payload gets its own holder key: time proofs must be strictly increasing per
holder, and concurrent requests may be ordered in any order, so sharing a holder
between in-flight requests would make valid requests fail for the wrong reason.
ML-DSA-44 holders are used by default because their keys are cheap to make.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from consensus.proofs.params import ValidationParams
from consensus.prover import FAULTS, HolderKeys, StorageCommitment, make_certificate_request, make_proof_set


@dataclass(slots=True)
class ProofFactory:
    params: ValidationParams
    scheme: str = "ML-DSA-44"
    prefix: str = field(default_factory=lambda: f"req-{secrets.token_hex(4)}")
    _storage: StorageCommitment | None = None
    _count: int = 0

    @property
    def storage(self) -> StorageCommitment:
        if self._storage is None:
            self._storage = StorageCommitment.generate(max(self.params.min_space_bytes, 1 << 16))
        return self._storage

    def next_id(self) -> str:
        self._count += 1
        return f"{self.prefix}-{self._count}"

    def proofs(self, request_id: str | None = None, fault: tuple[str, str] | None = None,
               timestamp_ms: int | None = None) -> dict[str, Any]:
        """A validate_proofs payload; ``fault`` (e.g. ("stake", "signature")) breaks one proof."""
        holder = HolderKeys.generate(self.scheme)
        return make_proof_set(
            request_id or self.next_id(), self.params, holder,
            timestamp_ms if timestamp_ms is not None else int(time.time() * 1000),
            storage=self.storage, fault=fault,
        )

    def certificate(self, common_name: str = "api.example.com", request_id: str | None = None,
                    fault: tuple[str, str] | None = None) -> dict[str, Any]:
        holder = HolderKeys.generate(self.scheme)
        return make_certificate_request(
            request_id or self.next_id(), self.params, holder, int(time.time() * 1000),
            common_name=common_name, san_entries=[common_name], storage=self.storage, fault=fault,
        )


def expected_reason(fault: tuple[str, str]) -> str:
    """The reason code a validator must report for a prover fault."""
    return FAULTS[fault[0]][fault[1]]
