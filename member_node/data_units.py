"""Whether a dataset's values are in the units its embodiment declares.

Every dimension is normalised by the embodiment's bound (``configs/embodiments.yaml``), so
values recorded in other units are read without complaint and trained on at the wrong scale.
LeRobot's own SO-100 follower records joints in degrees (or in -100..100 of its calibrated
range) and the gripper in 0..100; kyodo's ``so100`` expects radians and 0..1. A check with
the real library found such a dataset passing ``data inspect`` with normalised values of 28
on the joints and 100 on the gripper, where about 1 is meant.

Two checks. A recording mostly in other units is refused where the member sets its node up
(``data inspect``, ``init``, ``start``), never in a round: a refusal there would be an answer
to the coordinator that depends on the data. It takes, per dimension, the median over
episodes of each episode's largest magnitude, which one episode alone cannot move past its
neighbours'. And an episode that reaches past the same line is left out, decided by that
episode alone (as one with non-finite values is): a check with the real library merged 20
episodes recorded in degrees into 30 in radians, which passed the first check and trained
at about 100x scale.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from member_node.lerobot import ACTION, ENV_STATE, STATE, Episode, LeRobotDataset, no_usable_episode
from shared_model.config import EmbodimentConfig

# How far past its bound a dimension's typical episode may reach. A unit mix-up is a factor of
# 57 (degrees for radians) or 100 (a gripper in percent); data a few times past its bound
# still trains, if badly, and is the consortium's bounds to revisit, not a member's error.
UNITS_FACTOR = 5.0

# (feature key, Episode attribute, EmbodimentConfig bound attribute)
BOUNDED_FEATURES = (
    (STATE, "state", "state_bound"),
    (ENV_STATE, "env_state", "env_state_bound"),
    (ACTION, "action", "action_bound"),
)


OUT_OF_UNITS = f"values past {UNITS_FACTOR:g}x the embodiment's bounds (recorded in other units?)"


def _reach(values: np.ndarray) -> np.ndarray:
    """Per dimension, the episode's largest magnitude."""
    return np.abs(values).max(axis=0)


def beyond_bounds(episode: Episode, emb: EmbodimentConfig) -> bool:
    """Whether some dimension of ``episode`` reaches past ``UNITS_FACTOR`` x its bound."""
    for _, attr, bound_attr in BOUNDED_FEATURES:
        values, bound = getattr(episode, attr), getattr(emb, bound_attr)
        if values is not None and bound and np.any(_reach(values) > UNITS_FACTOR * np.asarray(bound)):
            return True
    return False


def without_episodes_beyond_bounds(dataset: LeRobotDataset, emb: EmbodimentConfig) -> LeRobotDataset:
    """The dataset with each episode that reaches past ``UNITS_FACTOR`` x a bound left out
    (``left_out``: OUT_OF_UNITS). DatasetError when none is left."""
    beyond = {ep.index for ep in dataset.episodes if beyond_bounds(ep, emb)}
    if not beyond:
        return dataset
    left_out = {**dataset.left_out, **dict.fromkeys(beyond, OUT_OF_UNITS)}
    kept = [ep for ep in dataset.episodes if ep.index not in beyond]
    if not kept:
        raise no_usable_episode(dataset.root, left_out)
    return dataclasses.replace(dataset, episodes=kept, left_out=left_out)


def typical_magnitude(episodes: Sequence[np.ndarray]) -> np.ndarray:
    """Per dimension, the median over episodes of the episode's largest |value|."""
    return np.median(np.stack([_reach(ep) for ep in episodes]), axis=0)


def unit_problems(dataset: LeRobotDataset, emb: EmbodimentConfig, name: str) -> list[str]:
    """One line per dimension whose typical episode reaches past ``UNITS_FACTOR`` x its bound."""
    problems = []
    features = dataset.info.get("features", {})
    for key, attr, bound_attr in BOUNDED_FEATURES:
        bound = np.asarray(getattr(emb, bound_attr) or [], dtype=np.float64)
        arrays = [getattr(ep, attr) for ep in dataset.episodes if getattr(ep, attr) is not None]
        if not arrays or bound.size == 0:
            continue
        typical = typical_magnitude(arrays)
        names = _names(features.get(key), len(bound))
        for dim in np.flatnonzero(typical > UNITS_FACTOR * bound):
            problems.append(
                f"{key} dimension {dim}{names[dim]}: a typical episode reaches {typical[dim]:.4g}, "
                f"{typical[dim] / bound[dim]:.0f}x its bound {bound[dim]:g} ({name} {bound_attr})"
            )
    return problems


def units_error(problems: Sequence[str], name: str) -> str:
    """What a member reads when its data is in other units than its embodiment's."""
    shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
    return (
        f"values far outside the bounds of embodiment {name!r}, most likely recorded in other units: {shown}. "
        "Each dimension is normalised by its bound, so the node would train on them at the wrong scale. "
        "LeRobot records SO-100/SO-101 joints in degrees (or -100..100) and grippers in 0..100, where kyodo's "
        "embodiments expect radians and 0..1: convert the dataset, or have the consortium declare an embodiment "
        "whose bounds (configs/embodiments.yaml) are in the units the robot records"
    )


def _names(spec: Mapping[str, Any] | None, dim: int) -> list[str]:
    names = spec.get("names") if isinstance(spec, Mapping) else None
    if isinstance(names, Mapping):  # LeRobot also writes {"motors": [...]}
        names = next(iter(names.values()), None)
    if isinstance(names, list) and len(names) == dim:
        return [f" ({n!r})" for n in names]
    return [""] * dim
