"""Proof of time: the holder-signed timestamp (authenticated by the stake signature) is
within the allowed offset of the agreed consensus time and strictly after the holder's
previous accepted time proof. Stateful, so it runs in execution order, not in precheck."""

from __future__ import annotations

from consensus.proofs.params import ValidationParams
from consensus.proofs.reasons import Reason, reason


def check_time(timestamp_ms: int, previous_ms: int | None, agreed_time_ms: int, params: ValidationParams) -> list[Reason]:
    out: list[Reason] = []
    offset = timestamp_ms - agreed_time_ms
    if abs(offset) > params.max_time_offset_ms:
        out.append(reason("time.outside_offset", f"timestamp {timestamp_ms} is {offset} ms from agreed time {agreed_time_ms} (allowed +/-{params.max_time_offset_ms})"))
    if previous_ms is not None and timestamp_ms <= previous_ms:
        out.append(reason("time.not_after_previous", f"timestamp {timestamp_ms} is not after the holder's previous accepted {previous_ms}"))
    return out
