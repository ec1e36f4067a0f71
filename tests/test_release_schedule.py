"""Which rounds of a run get the held-out error releases a noise plan has room for."""

import pytest

from member_node.release_schedule import ReleaseSchedule


def _released_rounds(schedule: ReleaseSchedule, asked: range) -> list[int]:
    """A node asked for every round of ``asked`` releases whenever one is due."""
    released: list[int] = []
    for rnd in asked:
        if len(released) < schedule.due(rnd):
            released.append(rnd)
    return released


def test_room_for_every_round_releases_every_round():
    schedule = ReleaseSchedule.of(1, 4, 4, 4)
    assert _released_rounds(schedule, range(1, 5)) == [1, 2, 3, 4]
    assert schedule.next_round(4) is None


def test_a_long_run_spreads_its_releases_evenly_and_ends_on_its_last_round():
    schedule = ReleaseSchedule.of(1, 40, 12, 40)
    rounds = _released_rounds(schedule, range(1, 41))
    assert len(rounds) == 12 and rounds[-1] == 40
    gaps = [b - a for a, b in zip([0, *rounds], rounds, strict=False)]
    assert set(gaps) <= {3, 4}
    assert schedule.next_round(0) == rounds[0] and schedule.next_round(11) == 40


def test_a_short_run_inside_a_long_pace_gets_its_share_and_at_least_its_final_one():
    assert _released_rounds(ReleaseSchedule.of(1, 40, 12, 4), range(1, 5)) == [4]  # 12 x 4/40 = 1.2
    assert _released_rounds(ReleaseSchedule.of(1, 20, 13, 8), range(1, 9)) == [2, 4, 5, 7, 8]  # 13 x 8/20 = 5.2
    assert _released_rounds(ReleaseSchedule.of(1, 160, 1, 4), range(1, 5)) == [4], "at least one per run"


def test_a_plan_made_mid_run_covers_the_run_from_its_first_round():
    schedule = ReleaseSchedule.of(5, 36, 10, 8)  # planned again at round 5 of an 8-round run
    assert (schedule.first_round, schedule.rounds, schedule.last_round) == (5, 4, 8)
    assert schedule.due(4) == 0, "rounds before the plan are not its to release"
    assert _released_rounds(schedule, range(5, 9)) == [8]


def test_a_member_left_out_of_rounds_releases_at_its_next_chance():
    schedule = ReleaseSchedule.of(1, 10, 5, 10)
    assert _released_rounds(schedule, range(1, 11)) == [2, 4, 6, 8, 10]
    assert _released_rounds(schedule, [1, 3, 5, 9, 10]) == [3, 5, 9, 10]  # asked for 5 rounds only


@pytest.mark.parametrize(
    "plan",
    [
        {"first_round": 1, "rounds": 40, "evaluations": 0, "run_rounds": 40},  # no room
        {"first_round": 1, "rounds": 40, "evaluations": 12},  # written before plans knew their run
        {"first_round": 1, "rounds": "x", "evaluations": 12, "run_rounds": 40},
    ],
)
def test_no_schedule_without_room_or_for_plans_from_before(plan):
    assert ReleaseSchedule.of_plan(plan) is None


def test_a_plan_re_made_within_a_run_gets_no_release_rounded_up():
    """A coordinator that re-made the plan every round (a nudged sample rate, the round named
    the run's last) got each new plan's share rounded up to one: a release every round."""
    assert ReleaseSchedule.of(5, 16, 1, 5, at_least_one=False) is not None
    assert ReleaseSchedule.of(5, 16, 1, 5, at_least_one=False).releases == 0
    assert ReleaseSchedule.of(5, 16, 1, 5).releases == 1
