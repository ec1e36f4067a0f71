"""Who sits out so that every seated member pinned every other (coordinator.pinning)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from coordinator.pinning import not_pinned_by, unpinned_members

NAMES = ["a", "b", "c", "d", "e"]


def test_nobody_pinned_or_everyone_pinned_everyone_leaves_nobody_out():
    assert unpinned_members({"a": None, "b": None}) == {}
    full = frozenset(NAMES)
    assert unpinned_members(dict.fromkeys(NAMES, full)) == {}
    assert unpinned_members({}) == {}


def test_the_member_with_the_old_file_sits_out_not_the_members_it_lacks():
    left = unpinned_members({"a": frozenset({"a"}), "b": frozenset("abc"), "c": frozenset("abc")})
    assert list(left) == ["a"]
    assert "does not list b, c" in left["a"]
    # Nobody lacks a: it only lacks others, which its own node already says.
    assert not_pinned_by({"a": frozenset({"a"}), "b": frozenset("abc"), "c": frozenset("abc")}, left) == {}


def test_a_newcomer_the_others_have_not_pinned_sits_out_not_them():
    old = frozenset("abc")
    left = unpinned_members({"a": old, "b": old, "c": old, "d": frozenset("abcd")})
    assert list(left) == ["d"]
    assert left["d"].startswith("a, b, c pinned a consortium file that does not list it")
    assert not_pinned_by({"a": old, "b": old, "c": old, "d": frozenset("abcd")}, left) == {"d": ["a", "b", "c"]}


def test_an_unpinned_member_is_left_out_only_by_a_pinned_one_that_lacks_it():
    assert unpinned_members({"a": frozenset("ab"), "b": None}) == {}
    assert list(unpinned_members({"a": frozenset("a"), "b": None, "c": None})) == ["a"]


@given(st.dictionaries(st.sampled_from(NAMES), st.none() | st.frozensets(st.sampled_from(NAMES))))
def test_every_member_left_seated_pinned_every_other_seated_member(pinned):
    left = unpinned_members(pinned)
    seated = set(pinned) - set(left)
    assert set(left) <= set(pinned) and all(left.values())
    for member in seated:
        if pinned[member] is not None:
            assert seated - {member} <= pinned[member]
    # Leaving out is a last resort: putting any one back breaks the seating.
    for member in left:
        trial = seated | {member}
        assert any(pinned[m] is not None and not trial - {m} <= pinned[m] for m in trial)
