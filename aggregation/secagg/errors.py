"""The single error type of the secure-aggregation primitives."""

from __future__ import annotations


class SecAggError(ValueError):
    """Raised when an input, key, share or ciphertext is unusable.

    A subclass of ``ValueError`` so callers that already treat bad input as ``ValueError``
    keep working, while the protocol driver can catch exactly the failures that should
    exclude a member (or abort a round) without swallowing unrelated bugs.
    """
