"""Deterministic synthetic robot episodes for every embodiment kind, written as LeRobot v3.0.

The demo and the tests need data with real structure (a controller driving a plant
toward a goal) so that a policy can actually learn something and held-out error means
something, yet nobody's private data. Every episode is a closed-loop rollout:

- ``arm``: joint-space position control. A reference moves toward a random goal
  configuration with a saturated proportional law (smooth ``tanh`` velocity limit); the
  action is the next joint target, the joints follow it with a first-order lag plus small
  process noise; the gripper closes once the arm is near the goal.
- ``arm_velocity``: the same task, but the action is the joint velocity command and the
  state carries joint velocities (the plant lags the commanded velocity).
- ``bimanual``: two position-controlled arms with independent goals.
- ``mobile_base``: a unicycle driving to a goal point with speed and yaw-rate limits; its
  "camera" features are a fixed random projection of the goal in the robot's frame, seeded
  by the embodiment name so every member's camera is the same.

The environment state holds the goal. All episodes are simulated at once (vectorised over
episodes; one Python step per frame), from ``numpy.random.Generator`` seeded by
``(seed, embodiment name)``.

With ``tasks=2`` an episode is a sequence of subtasks, as a long-horizon recording with
LeRobot's per-frame task annotations: it starts, at random, with that task or the
embodiment's *home* task ("return to the home configuration and keep the gripper open",
"drive back to the origin"), and switches between the two every 0.5 to 1.5 s. Each frame's
task_index names the subtask the demonstrator is doing. The goal stays drawn and shown in
the environment state (and the base's camera) throughout, so after a switch the
observation history still shows the robot heading the old way: only a policy that reads
the task (``model.task_buckets``) knows to turn. Why subtasks and not one task per episode:
with a history of states, a robot's motion gives its task away a few frames into an
episode, so whole-episode tasks left nothing for the text to add (bench/task_conditioning.py).
The schedule comes from a stream of its own, so ``tasks=1`` data is unchanged by the option.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from member_node.lerobot import ACTION, ENV_STATE, IMAGE_FEATURES, STATE, Episode, write_dataset
from shared_model.config import EmbodimentConfig

LENGTH_JITTER = 0.1  # episode lengths vary by +-10% around episode_seconds
PROCESS_NOISE = 0.002  # per-step noise on joint positions (rad) / speeds


@dataclass(frozen=True)
class Rollout:
    """Arrays for all episodes, padded to the longest one: [E, T_max, dim]."""

    state: np.ndarray
    env_state: np.ndarray
    action: np.ndarray
    image_features: np.ndarray | None
    names: dict[str, list[str]]
    # The task texts: [0] the goal task, [1] the home task (frames with ``home`` set)
    tasks: tuple[str, str]


# (rng, embodiment, name, episodes, steps, home): ``home[i, t]`` makes frame t of episode i
# part of the home task
Simulator = Callable[[np.random.Generator, EmbodimentConfig, str, int, int, np.ndarray], Rollout]
MAX_TASKS = 2


def generate_episodes(
    embodiment_name: str,
    embodiment: EmbodimentConfig,
    episodes: int,
    episode_seconds: float,
    seed: int,
    *,
    tasks: int = 1,
) -> list[Episode]:
    """Simulate ``episodes`` rollouts in memory (what :func:`generate_dataset` writes)."""
    return _simulate(embodiment_name, embodiment, episodes, episode_seconds, seed, tasks)[0]


def _simulate(
    embodiment_name: str, embodiment: EmbodimentConfig, episodes: int, episode_seconds: float, seed: int, tasks: int
) -> tuple[list[Episode], Rollout]:
    if episodes < 1 or episode_seconds <= 0:
        raise ValueError("episodes must be >= 1 and episode_seconds > 0")
    if not 1 <= tasks <= MAX_TASKS:
        raise ValueError(f"tasks must be 1 (the goal task) or 2 (goal and home tasks), got {tasks}")
    simulator = SIMULATORS.get(embodiment.kind)
    if simulator is None:
        raise ValueError(f"embodiment {embodiment_name!r} has kind {embodiment.kind!r}; known: {sorted(SIMULATORS)}")
    key = [_check_seed(seed), _name_key(embodiment_name)]
    rng = np.random.default_rng(np.random.SeedSequence(key))
    nominal = episode_seconds * embodiment.fps
    lengths = np.maximum(np.rint(nominal * rng.uniform(1 - LENGTH_JITTER, 1 + LENGTH_JITTER, episodes)), 2).astype(int)
    steps = int(lengths.max())
    home = np.zeros((episodes, steps), dtype=bool)
    if tasks > 1:  # its own stream: the goal task's draws are the same with or without it
        schedule = np.random.default_rng(np.random.SeedSequence([*key, _name_key("kyodo/home-task")]))
        home = _subtask_schedule(schedule, episodes, steps, embodiment.fps)
    rollout = simulator(rng, embodiment, embodiment_name, episodes, steps, home)
    out = []
    for i, length in enumerate(lengths):
        image = None if rollout.image_features is None else rollout.image_features[i, :length]
        env = rollout.env_state[i, :length] if embodiment.env_state_dim else None
        tasks_of = _frame_tasks(rollout, home[i, :length])
        out.append(Episode(i, rollout.state[i, :length], env, image, rollout.action[i, :length], **tasks_of))
    return out, rollout


def _subtask_schedule(rng: np.random.Generator, episodes: int, steps: int, fps: int) -> np.ndarray:
    """``[episodes, steps]`` bool, True in home-task frames: a random first subtask, then a
    switch every 0.5-1.5 s."""
    home = np.empty((episodes, steps), dtype=bool)
    for i in range(episodes):
        current, t = bool(rng.random() < 0.5), 0
        while t < steps:
            span = int(rng.integers(max(1, fps // 2), max(2, 3 * fps // 2) + 1))
            home[i, t : t + span] = current
            current, t = not current, t + span
    return home


def _frame_tasks(rollout: Rollout, home: np.ndarray) -> dict:
    """An episode's ``tasks`` (in the order it meets them) and ``task_of_frame``."""
    first = rollout.tasks[int(home[0])]
    if np.all(home == home[0]):
        return {"tasks": (first,)}
    other = rollout.tasks[1 - int(home[0])]
    return {"tasks": (first, other), "task_of_frame": (home != home[0]).astype(np.int64)}


def generate_dataset(
    root: Path | str,
    embodiment_name: str,
    embodiment: EmbodimentConfig,
    episodes: int,
    episode_seconds: float,
    seed: int,
    *,
    tasks: int = 1,
    overwrite: bool = False,
    data_files_size_in_mb: float = 100,
) -> Path:
    """Generate episodes and write them as a LeRobot v3.0 dataset at ``root``."""
    eps, rollout = _simulate(embodiment_name, embodiment, episodes, episode_seconds, seed, tasks)
    return write_dataset(
        root,
        embodiment,
        embodiment_name,
        eps,
        names=rollout.names,
        overwrite=overwrite,
        data_files_size_in_mb=data_files_size_in_mb,
    )


def _check_seed(seed: int) -> int:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return int(seed)


def _name_key(name: str) -> int:
    """A stable integer from a name (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _lag(dt: float, tau: float) -> float:
    """Per-step gain of a first-order lag with time constant ``tau`` (exact discretisation)."""
    return float(1.0 - np.exp(-dt / tau))


# ----------------------------------------------------------------------------- arms


@dataclass(frozen=True)
class _ArmLayout:
    arms: int
    joints: int  # per arm

    def joint_dims(self) -> np.ndarray:
        """Indices of joint entries in the per-arm [joints..., gripper] state layout."""
        per_arm = self.joints + 1
        return np.array([a * per_arm + j for a in range(self.arms) for j in range(self.joints)])

    def gripper_dims(self) -> np.ndarray:
        return np.array([a * (self.joints + 1) + self.joints for a in range(self.arms)])


def _position_layout(emb: EmbodimentConfig, name: str, arms: int) -> _ArmLayout:
    joints = emb.state_dim // arms - 1
    if joints < 1 or emb.state_dim != arms * (joints + 1) or emb.env_state_dim != arms * joints:
        raise ValueError(
            f"embodiment {name!r} ({emb.kind}): expected state_dim = {arms} x (joints + 1) and "
            f"env_state_dim = {arms} x joints, got {emb.state_dim} and {emb.env_state_dim}"
        )
    if emb.action_dim != emb.state_dim:
        raise ValueError(f"embodiment {name!r} ({emb.kind}): action_dim must equal state_dim for position control")
    return _ArmLayout(arms, joints)


def _sample_goal_task(
    rng: np.random.Generator, limits: np.ndarray, episodes: int, spread: float
) -> tuple[np.ndarray, np.ndarray]:
    """Start and goal configurations inside ``spread`` x the joint limits."""
    start = rng.uniform(-spread, spread, (episodes, limits.size)) * limits
    goal = rng.uniform(-spread, spread, (episodes, limits.size)) * limits
    return start, goal


def _gripper_command(q: np.ndarray, goal: np.ndarray, layout: _ArmLayout) -> np.ndarray:
    """1 = open while far from the goal, smoothly 0 = closed once within ~0.1 rad of it."""
    dist = np.linalg.norm((goal - q).reshape(len(q), layout.arms, layout.joints), axis=-1)
    return _sigmoid((dist - 0.1) / 0.02)


def _home_target(goal: np.ndarray, home: np.ndarray) -> np.ndarray:
    """Where each episode heads this frame: its goal, or the origin (home configuration) in
    a home-task frame (``home`` is this frame's column)."""
    return np.where(home[:, None], 0.0, goal)


def _gripper_for(q: np.ndarray, target: np.ndarray, layout: _ArmLayout, home: np.ndarray) -> np.ndarray:
    """Closes near the goal; the home task keeps it open."""
    return np.where(home[:, None], 1.0, _gripper_command(q, target, layout))


def _simulate_position_arms(
    rng: np.random.Generator, emb: EmbodimentConfig, layout: _ArmLayout, episodes: int, steps: int, home: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    dt, vmax, kp = 1.0 / emb.fps, 1.2, 3.0
    jd, gd = layout.joint_dims(), layout.gripper_dims()
    limits = 0.8 * np.minimum(np.asarray(emb.state_bound)[jd], np.asarray(emb.action_bound)[jd])
    q, goal = _sample_goal_task(rng, limits, episodes, 0.6)
    ref = q.copy()
    grip = np.ones((episodes, layout.arms))
    noise = rng.normal(0.0, PROCESS_NOISE, (steps, episodes, limits.size))
    a_joint, a_grip = _lag(dt, 0.08), _lag(dt, 0.1)
    state = np.empty((episodes, steps, emb.state_dim))
    action = np.empty((episodes, steps, emb.action_dim))
    for t in range(steps):
        state[:, t, jd], state[:, t, gd] = q, grip
        target = _home_target(goal, home[:, t])
        ref = np.clip(ref + dt * vmax * np.tanh(kp * (target - ref) / vmax), -limits, limits)
        grip_cmd = _gripper_for(q, target, layout, home[:, t])
        action[:, t, jd], action[:, t, gd] = ref, grip_cmd
        q = np.clip(q + a_joint * (ref - q) + noise[t], -limits, limits)
        grip = np.clip(grip + a_grip * (grip_cmd - grip), 0.0, 1.0)
    env = np.broadcast_to(goal[:, None, :], (episodes, steps, goal.shape[1]))
    return state, env, action


def _arm_names(layout: _ArmLayout) -> dict[str, list[str]]:
    prefixes = [""] if layout.arms == 1 else ["left_", "right_"][: layout.arms]
    state, goal, action = [], [], []
    for p in prefixes:
        state += [f"{p}joint_{j}.pos" for j in range(layout.joints)] + [f"{p}gripper.pos"]
        goal += [f"{p}goal.joint_{j}.pos" for j in range(layout.joints)]
        action += [f"{p}joint_{j}.target" for j in range(layout.joints)] + [f"{p}gripper.cmd"]
    return {STATE: state, ENV_STATE: goal, ACTION: action}


def _sim_position(arms: int, tasks: tuple[str, str]) -> Simulator:
    def simulate(
        rng: np.random.Generator, emb: EmbodimentConfig, name: str, episodes: int, steps: int, home: np.ndarray
    ) -> Rollout:
        layout = _position_layout(emb, name, arms)
        state, env, action = _simulate_position_arms(rng, emb, layout, episodes, steps, home)
        return Rollout(_f32(state), _f32(env), _f32(action), None, _arm_names(layout), tasks)

    return simulate


def _sim_arm_velocity(
    rng: np.random.Generator, emb: EmbodimentConfig, name: str, episodes: int, steps: int, home: np.ndarray
) -> Rollout:
    joints = emb.env_state_dim
    if joints < 1 or emb.state_dim != 2 * joints + 1 or emb.action_dim != joints + 1:
        raise ValueError(
            f"embodiment {name!r} (arm_velocity): expected state_dim = 2 x joints + 1, action_dim = joints + 1 "
            f"with joints = env_state_dim = {joints}; got state_dim {emb.state_dim}, action_dim {emb.action_dim}"
        )
    layout = _ArmLayout(1, joints)
    dt, kp = 1.0 / emb.fps, 3.0
    bound = np.asarray(emb.state_bound)
    limits = 0.8 * bound[:joints]
    vmax = 0.8 * np.minimum(bound[joints : 2 * joints], np.asarray(emb.action_bound)[:joints])
    q, goal = _sample_goal_task(rng, limits, episodes, 0.4)
    qd = np.zeros_like(q)
    grip = np.ones((episodes, 1))
    noise = rng.normal(0.0, PROCESS_NOISE / dt, (steps, episodes, joints))
    a_vel, a_grip = _lag(dt, 0.06), _lag(dt, 0.1)
    state = np.empty((episodes, steps, emb.state_dim))
    action = np.empty((episodes, steps, emb.action_dim))
    for t in range(steps):
        state[:, t, :joints], state[:, t, joints:-1], state[:, t, -1:] = q, qd, grip
        target = _home_target(goal, home[:, t])
        v_cmd = vmax * np.tanh(kp * (target - q) / vmax)
        grip_cmd = _gripper_for(q, target, layout, home[:, t])
        action[:, t, :joints], action[:, t, joints:] = v_cmd, grip_cmd
        qd = np.clip(qd + a_vel * (v_cmd - qd) + noise[t] * a_vel, -vmax * 1.1, vmax * 1.1)
        q = np.clip(q + dt * qd, -limits, limits)
        grip = np.clip(grip + a_grip * (grip_cmd - grip), 0.0, 1.0)
    env = np.broadcast_to(goal[:, None, :], (episodes, steps, joints))
    names = {
        STATE: [f"joint_{j}.pos" for j in range(joints)] + [f"joint_{j}.vel" for j in range(joints)] + ["gripper.pos"],
        ENV_STATE: [f"goal.joint_{j}.pos" for j in range(joints)],
        ACTION: [f"joint_{j}.vel_cmd" for j in range(joints)] + ["gripper.cmd"],
    }
    tasks = (
        "move to the goal joint configuration and close the gripper (velocity control)",
        "return to the home configuration and keep the gripper open (velocity control)",
    )
    return Rollout(_f32(state), _f32(env), _f32(action), None, names, tasks)


# ----------------------------------------------------------------------------- mobile base


def _wrap(angle: np.ndarray) -> np.ndarray:
    return (angle + np.pi) % (2 * np.pi) - np.pi


def _camera(name: str, dim: int) -> np.ndarray:
    """The fixed "camera": a random projection seeded by the embodiment name only."""
    rng = np.random.default_rng(np.random.SeedSequence([_name_key("kyodo/camera/" + name)]))
    return rng.normal(0.0, 1.0, (dim, 3)) / np.sqrt(3.0)


def _sim_mobile_base(
    rng: np.random.Generator, emb: EmbodimentConfig, name: str, episodes: int, steps: int, home: np.ndarray
) -> Rollout:
    if emb.state_dim != 5 or emb.env_state_dim != 2 or emb.action_dim != 2:
        raise ValueError(
            f"embodiment {name!r} (mobile_base): expected state_dim 5 (x, y, heading, speed, yaw rate), "
            f"env_state_dim 2 (goal x, y), action_dim 2; got {emb.state_dim}, {emb.env_state_dim}, {emb.action_dim}"
        )
    dt = 1.0 / emb.fps
    sb, ab = np.asarray(emb.state_bound), np.asarray(emb.action_bound)
    arena = 0.8 * min(sb[0], sb[1], *emb.env_state_bound)
    vmax, wmax = 0.8 * min(sb[3], ab[0]), 0.9 * min(sb[4], ab[1])
    pos = rng.uniform(-0.6 * arena, 0.6 * arena, (episodes, 2))
    heading = rng.uniform(-np.pi, np.pi, episodes)
    bearing0 = rng.uniform(-np.pi, np.pi, episodes)
    goal = np.clip(
        pos + rng.uniform(0.5, 1.5, (episodes, 1)) * np.stack([np.cos(bearing0), np.sin(bearing0)], 1), -arena, arena
    )
    v = np.zeros(episodes)
    w = np.zeros(episodes)
    noise = rng.normal(0.0, PROCESS_NOISE * 5, (steps, episodes, 2))
    cam_noise = rng.normal(0.0, 0.02, (episodes, steps, emb.image_feature_dim)) if emb.image_feature_dim else None
    alpha = _lag(dt, 0.2)
    state = np.empty((episodes, steps, 5))
    action = np.empty((episodes, steps, 2))
    rel_robot = np.empty((episodes, steps, 3))
    for t in range(steps):
        state[:, t] = np.stack([pos[:, 0], pos[:, 1], heading, v, w], axis=1)
        rel = goal - pos
        rho = np.linalg.norm(rel, axis=1)
        bearing = _wrap(np.arctan2(rel[:, 1], rel[:, 0]) - heading)
        rel_robot[:, t] = np.stack(
            [rho * np.cos(bearing), rho * np.sin(bearing), rho], axis=1
        )  # the camera sees the goal
        if home[:, t].any():  # steer for the origin instead: the same law, another target
            rel = _home_target(goal, home[:, t]) - pos
            rho = np.linalg.norm(rel, axis=1)
            bearing = _wrap(np.arctan2(rel[:, 1], rel[:, 0]) - heading)
        v_cmd = vmax * np.tanh(1.2 * rho / vmax) * np.maximum(np.cos(bearing), 0.0)
        w_cmd = wmax * np.tanh(2.5 * bearing / wmax) * np.tanh(rho / 0.15)
        action[:, t] = np.stack([v_cmd, w_cmd], axis=1)
        v = np.clip(v + alpha * (v_cmd - v) + noise[t, :, 0], -0.95 * sb[3], 0.95 * sb[3])
        w = np.clip(w + alpha * (w_cmd - w) + noise[t, :, 1], -0.95 * sb[4], 0.95 * sb[4])
        heading = _wrap(heading + dt * w)
        pos = np.clip(pos + dt * v[:, None] * np.stack([np.cos(heading), np.sin(heading)], axis=1), -sb[:2], sb[:2])
    env = np.broadcast_to(goal[:, None, :], (episodes, steps, 2))
    image = None
    if cam_noise is not None:
        image = _f32(np.tanh(rel_robot @ _camera(name, emb.image_feature_dim).T + cam_noise))
    names = {
        STATE: ["x", "y", "heading", "speed", "yaw_rate"],
        ENV_STATE: ["goal.x", "goal.y"],
        ACTION: ["speed_cmd", "yaw_rate_cmd"],
        IMAGE_FEATURES: [f"camera.{i}" for i in range(emb.image_feature_dim)],
    }
    tasks = ("drive to the goal point", "drive back to the origin of the map")
    return Rollout(_f32(state), _f32(env), _f32(action), image, names, tasks)


SIMULATORS: dict[str, Simulator] = {
    "arm": _sim_position(
        1,
        (
            "move to the goal joint configuration and close the gripper",
            "return to the home configuration and keep the gripper open",
        ),
    ),
    "arm_velocity": _sim_arm_velocity,
    "bimanual": _sim_position(
        2,
        (
            "move both arms to their goal configurations and close both grippers",
            "return both arms to the home configuration and keep both grippers open",
        ),
    ),
    "mobile_base": _sim_mobile_base,
}
