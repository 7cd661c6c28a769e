"""Why a proof failed: machine-readable ``code`` (``<proof>.<what>``) plus a
deterministic message. Every replica must produce byte-identical reasons, so messages
are built only from request values and fixed text, never from library exception text."""

from __future__ import annotations

from dataclasses import dataclass

# Order in which reasons appear in an Outcome (stable within one proof).
PROOF_ORDER = ("request", "work", "stake", "time", "space", "csr", "policy")

CODES: dict[str, str] = {
    "request.malformed": "the request bytes could not be decoded (only from a faulty leader)",
    "work.challenge_mismatch": "the work challenge is not the one derived from this request and holder",
    "work.difficulty_not_met": "SHA-256(challenge || nonce) has too few leading zero bits",
    "stake.unsupported_scheme": "the stake signature scheme is not accepted by this cluster",
    "stake.below_minimum": "the staked amount is below the cluster minimum",
    "stake.bad_signature": "the stake signature does not verify (or the key is malformed)",
    "time.outside_offset": "the timestamp is too far from the agreed consensus time",
    "time.not_after_previous": "the timestamp is not after the holder's previous accepted one",
    "space.bad_commitment": "chunk size or total size of the storage commitment is malformed",
    "space.too_small": "the committed storage is below the cluster minimum",
    "space.decapsulation_failed": "the ML-KEM-1024 ciphertext could not be decapsulated",
    "space.aead_failed": "the sealed answers do not open (wrong key, tampered, or wrong binding)",
    "space.malformed_answers": "the opened answers are not the expected list of [index, chunk, siblings]",
    "space.wrong_challenge": "an answer is for another chunk index than the derived challenge",
    "space.bad_path": "an answer's Merkle inclusion path does not lead to the committed root",
    "csr.malformed": "the CSR is not a parseable PKCS#10 request",
    "csr.bad_signature": "the CSR's self-signature does not verify",
    "csr.name_mismatch": "the CSR subject CN is not the requested common_name",
    "csr.invalid_dns_name": "a name is not a valid DNS name (RFC 1123; wildcard only as whole left-most label) or IP",
    "csr.duplicate_san": "san_entries lists the same name twice",
    "csr.san_mismatch": "the CSR's subjectAltName entries differ from san_entries",
    "csr.unsupported_san": "the CSR has subjectAltName entries other than DNS names and IPs",
    "csr.unsupported_key": "the CSR's key type or curve is not accepted",
    "csr.weak_key": "the CSR's RSA key is shorter than the policy minimum",
    "policy.validity_too_long": "validity_days exceeds the policy maximum",
    "policy.validity_too_short": "validity_days is below 1",
    "policy.too_many_san": "more san_entries than the policy allows",
    "policy.cn_not_in_san": "the common_name is not among san_entries",
    "policy.wildcard_not_allowed": "wildcard names are disabled by policy",
    "policy.ip_not_allowed": "IP address names are disabled by policy",
}


@dataclass(frozen=True, slots=True)
class Reason:
    proof: str
    code: str
    message: str

    def to_wire(self) -> dict[str, str]:
        return {"proof": self.proof, "code": self.code, "message": self.message}


def reason(code: str, message: str) -> Reason:
    if code not in CODES:  # a typo here would silently leak an undocumented code
        raise KeyError(f"undocumented reason code {code!r}")
    return Reason(code.split(".", 1)[0], code, message)


def ordered(reasons: list[Reason] | tuple[Reason, ...]) -> tuple[Reason, ...]:
    """Stable sort by proof order: the same reasons in the same order on every node."""
    return tuple(sorted(reasons, key=lambda r: PROOF_ORDER.index(r.proof)))
