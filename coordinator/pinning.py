"""Seat together only members that pinned each other's identity keys.

A member's node pinned to the consortium's published file refuses, at share keys, a cohort
that seats anyone the file does not list, and it learns the cohort only after it trained:
its budget is spent for nothing, and so is that of every member of its cohorts, whose sum
can no longer be unmasked. A walkthrough lost two members' shared shards for two rounds that
way (one member had pinned the file before the others were admitted). Nodes say at query
which members they pinned, so the coordinator leaves out, before planning, whoever would
break a cohort.
"""

from __future__ import annotations

from collections.abc import Mapping

from shared_model.text import shortened

TRUST = "`kyodo-member trust` with the operator's current audit-consortium.yaml"


def unpinned_members(pinned: Mapping[str, frozenset[str] | None]) -> dict[str, str]:
    """The members to leave out of a round, each with why, so that every member left pins
    every other (``pinned``: each candidate's pinned names, None for a node that pins none).

    Greedy: the member in the most conflicts goes first (ties: the later name), so a member
    admitted before the others re-pinned sits out rather than all of them, and a member with
    an old file sits out rather than the members it does not list. Then each one left out is
    seated again if it now fits, so no member sits out that could have trained."""
    seated = set(pinned)
    removed: list[str] = []
    while True:
        conflicts = {m: len(_lacks(pinned, m, seated)) + len(_lacked_by(pinned, m, seated)) for m in seated}
        worst = max(seated, key=lambda m: (conflicts[m], m), default=None)
        if worst is None or conflicts[worst] == 0:
            break
        seated.remove(worst)
        removed.append(worst)
    for member in reversed(removed):
        if not _lacks(pinned, member, seated) and not _lacked_by(pinned, member, seated):
            seated.add(member)
    return {m: _why(pinned, m, seated) for m in removed if m not in seated}


def not_pinned_by(pinned: Mapping[str, frozenset[str] | None], left_out: Mapping[str, str]) -> dict[str, list[str]]:
    """For each member ``left_out``, the seated members whose pinned file does not list it.

    These are what its own node cannot know (its file is the newest) and is told: what it
    lacks itself, its node already logs from the query's roster."""
    seated = set(pinned) - set(left_out)
    return {m: names for m in left_out if (names := _lacked_by(pinned, m, seated))}


def _why(pinned: Mapping[str, frozenset[str] | None], member: str, seated: set[str]) -> str:
    reasons = []
    lacks, lacked_by = _lacks(pinned, member, seated), _lacked_by(pinned, member, seated)
    if lacks:
        reasons.append(
            f"its pinned consortium file does not list {shortened(lacks)}, who would share its cohorts "
            f"(it runs {TRUST}, then restarts its node)"
        )
    if lacked_by:
        reasons.append(
            f"{shortened(lacked_by)} pinned a consortium file that does not list it (they run {TRUST}, "
            "then restart their nodes)"
        )
    return "; ".join(reasons)


def _lacked_by(pinned: Mapping[str, frozenset[str] | None], member: str, seated: set[str]) -> list[str]:
    return sorted(o for o in seated if o != member and pinned[o] is not None and member not in pinned[o])


def _lacks(pinned: Mapping[str, frozenset[str] | None], member: str, seated: set[str]) -> list[str]:
    names = pinned[member]
    return [] if names is None else sorted(seated - names - {member})
