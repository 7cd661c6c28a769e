"""Byzantine evidence that anyone holding the manifest can re-check.

Two kinds are produced by the replica:

* ``equivocation`` — ``messages = (a, b)``: two wire messages of the same kind
  (pre-prepare, prepare, commit, result-vote or checkpoint), both validly signed by
  ``accused``, for the same slot — (view, seq) for the three ordering kinds (and that
  view is ``evidence.view``), seq for the other two — with different digests/roots.
  A pre-prepare's signature covers only its header ``[view, seq, agreed_time_ms,
  digest]``, so either message may be a header alone (requests stripped, see
  ``messages.preprepare_header_wire``): that is how a leader that sent different
  proposals to different replicas is proven — one header from the pre-prepare a replica
  accepted, the other from a prepare, which carries the leader's header signature.
  ``accused`` must be the leader of that view.
* ``wrong-result`` — ``messages = (vote, c1, ..., ck)``: a result-vote signed by
  ``accused`` whose root differs from a root certified by k >= 2f+1 distinct *other*
  validators' result-votes for the same seq.

Checks depend only on signatures and the key ring; the cluster id is read from the
messages themselves (and all must agree).
"""

from __future__ import annotations

from consensus.actions import Evidence
from consensus.keys import KeyRing
from consensus.messages import CHECKPOINT, COMMIT, PRE_PREPARE, PREPARE, RESULT_VOTE, Message, decode_verified

EQUIVOCATION = "equivocation"
WRONG_RESULT = "wrong-result"
_ORDERING = (PRE_PREPARE, PREPARE, COMMIT)


def slot_of(msg: Message) -> tuple[int, int, bytes]:
    """(view, seq, value) of a slot message; view is 0 for seq-only kinds."""
    p = msg.payload
    if msg.kind in _ORDERING:
        return p.view, p.seq, p.digest  # type: ignore[union-attr]
    if msg.kind == RESULT_VOTE:
        return 0, p.seq, p.root  # type: ignore[union-attr]
    if msg.kind == CHECKPOINT:
        return 0, p.seq, p.state_digest  # type: ignore[union-attr]
    raise ValueError(f"{msg.kind} has no slot")


def verify_evidence(keyring: KeyRing, evidence: Evidence) -> bool:
    msgs = [decode_verified(m, keyring, None, None) for m in evidence.messages]
    if len(msgs) < 2 or any(m is None for m in msgs):
        return False
    first = msgs[0]
    assert first is not None
    if first.signer != evidence.accused or any(m.cluster_id != first.cluster_id for m in msgs if m):
        return False
    if evidence.kind == EQUIVOCATION:
        if len(msgs) != 2:
            return False
        a, b = msgs
        assert a is not None and b is not None
        if a.kind != b.kind or a.kind not in (*_ORDERING, RESULT_VOTE, CHECKPOINT) or b.signer != evidence.accused:
            return False
        va, sa, xa = slot_of(a)
        vb, sb, xb = slot_of(b)
        if a.kind in _ORDERING and va != evidence.view:
            return False
        if a.kind == PRE_PREPARE and keyring.node_ids[va % keyring.n] != evidence.accused:
            return False  # only the view's leader signs pre-prepare headers
        return xa != xb and (va, sa) == (vb, sb) and sa == evidence.seq
    if evidence.kind == WRONG_RESULT:
        if first.kind != RESULT_VOTE:
            return False
        _, seq, bad_root = slot_of(first)
        if seq != evidence.seq:
            return False
        roots: dict[bytes, set[str]] = {}
        for m in msgs[1:]:
            assert m is not None
            if m.kind != RESULT_VOTE or m.signer == evidence.accused:
                return False
            _, s, r = slot_of(m)
            if s != seq:
                return False
            roots.setdefault(r, set()).add(m.signer)
        if len(roots) != 1:
            return False
        (root, signers), = roots.items()
        return root != bad_root and len(signers) >= keyring.quorum
    return False
