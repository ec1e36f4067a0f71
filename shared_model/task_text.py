"""The task instruction as the policy reads it: hashed words and word pairs, no vocabulary.

LeRobot datasets name each episode's task in plain text ("pick up the red cube"), and a
multi-task policy must be told which one it is doing: two episodes that start from the same
observation may need opposite actions. The text becomes a fixed-width vector by the hashing
trick: each lowercase word and each pair of neighbouring words is hashed into one of
``buckets`` slots with a sign, and the counts are scaled to unit length. A linear layer of
the shared adapter (``task_proj``, in ``shared_model.policy``) turns that vector into a
conditioning offset added to every observation token.

Why hashing and not a learned vocabulary or a pretrained text encoder:

- a vocabulary would have to be agreed between members, which means publishing every
  member's task texts to the consortium; the hash needs nothing but the bucket count, and
  the same words land in the same buckets on every node, so "close the gripper" written by
  one member and another is the same input to the shared layer;
- no model hub is reachable from a member's data center in this project's setting, and a
  text encoder's weights would be another artefact every member must verify;
- the hash is keyed by a public constant (not Python's per-process salted ``hash``) so that
  every node, every process and every run computes the same vector.

A collision only shares a slot between two words; the signs keep colliding words from
adding up systematically (Weinberger et al. 2009). Word pairs let "move left" and "left
move" differ. The empty text is the zero vector: a dataset without tasks adds nothing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np

_WORD = re.compile(r"[a-z0-9]+")
_KEY = b"kyodo/task-text/v1"


def task_words(text: str) -> list[str]:
    """Lowercase words and neighbouring word pairs: what is hashed."""
    words = _WORD.findall(text.lower())
    return words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]


def _slot(token: str, buckets: int) -> tuple[int, float]:
    digest = hashlib.blake2b(token.encode(), digest_size=8, key=_KEY).digest()
    value = int.from_bytes(digest, "little")
    return (value >> 1) % buckets, (1.0 if value & 1 else -1.0)


def task_vector(text: str, buckets: int) -> np.ndarray:
    """``[buckets]`` float32, unit length (zero for a text without words)."""
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    vec = np.zeros(buckets, dtype=np.float64)
    for token in task_words(text):
        slot, sign = _slot(token, buckets)
        vec[slot] += sign
    norm = float(np.linalg.norm(vec))
    return (vec / norm if norm > 0 else vec).astype(np.float32)


def task_table(texts: Sequence[str], buckets: int) -> np.ndarray:
    """``[len(texts), buckets]``: one row per text, in order."""
    if not texts:
        return np.zeros((0, buckets), dtype=np.float32)
    return np.stack([task_vector(t, buckets) for t in texts])
