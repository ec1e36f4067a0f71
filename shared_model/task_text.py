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
move" differ. Words are Unicode words of the NFKC-normalised, case-folded text, so
"Öffnen" and "öffnen" are one word and "café" is not "caf". A script written without
spaces (Japanese, Chinese, Thai: a word holding a letter of Unicode category ``Lo``) adds
its words' character pairs too, so "赤いキューブを拾う" and "青いキューブを拾う" share most
of their features instead of being two unrelated whole-sentence "words". The empty text
(or one with no letter or digit) is the zero vector: a dataset without tasks adds nothing.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence

import numpy as np

_WORD = re.compile(r"[^\W_]+")  # Unicode letters and digits
_KEY = b"kyodo/task-text/v1"


def task_words(text: str) -> list[str]:
    """Words, neighbouring word pairs, and the character pairs of words in scripts written
    without spaces: what is hashed."""
    words = _WORD.findall(unicodedata.normalize("NFKC", text).casefold())
    tokens = words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]
    for word in words:
        if any(unicodedata.category(c) == "Lo" for c in word):
            tokens += [f"#{a}{b}" for a, b in zip(word, word[1:], strict=False)]  # '#': never a word
    return tokens


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
