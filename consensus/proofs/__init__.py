"""The four proofs (work, stake, time, space) as small, pure checks.

Each ``check_*`` returns a list of ``Reason`` (empty = passed). ``binding`` holds every
byte layout that is hashed, signed or sealed; ``params`` the cluster-wide parameters.
"""

from consensus.proofs.params import ValidationParams
from consensus.proofs.reasons import CODES, Reason

__all__ = ["CODES", "Reason", "ValidationParams"]
