"""``kyodo-member plan``: what a privacy budget buys, before the member commits to it.

A member sets (epsilon, delta) and a pace (``budget-rounds``) but trains with a noise
multiplier its node derives from them; whether that noise leaves anything to learn depends on
how many episodes the member holds. This answers the question before a run, from the same
functions the node plans with (``privacy.budget``), the member's own ledger and its own
dataset, without starting the node: the noise multiplier the node would use in the next run,
what each round and the whole run would spend, and the same for longer paces, so the member
can pick one. Nothing here leaves the member's machine.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from member_node.lerobot import DatasetError, read_dataset
from member_node.release_schedule import ReleaseSchedule
from member_node.supernode import MemberSetup, SetupError, load_setup
from member_node.windows import split_episodes
from privacy.accountant import Mechanism, check_accountant
from privacy.accountant import epsilon as composed_epsilon
from privacy.budget import (
    EVALUATION_NOISE_INCREASE,
    Budget,
    NoisePlan,
    evaluation_leaves_room,
    plan_noise,
    rounds_to_spread,
)
from privacy.eval_release import EvalPrivacy
from privacy.ledger import RELEASE_TRAIN, Ledger, LedgerError, mechanism_of, release_of
from shared_model.config import ConfigError, KyodoConfig, load_config

# Paces offered beside the node's own, so the member sees what a longer one buys.
PACES = (10, 20, 40, 80, 160)


@dataclass(frozen=True)
class PlanSettings:
    """What the plan depends on: the member's own settings and the consortium's public ones."""

    budget: Budget
    budget_rounds: int  # the member's pace (0: the coordinator's planned rounds only)
    evaluation: Mechanism | None  # one held-out error release (None: the node releases none)
    accountant: str
    sample_rate: float  # the consortium's public q
    local_steps: int
    run_rounds: int  # rounds the coordinator plans for the next run
    max_noise_multiplier: float  # above it the node declines: an update mostly noise


@dataclass(frozen=True)
class PaceRow:
    """One pace: the budget left spread over ``spread`` training rounds."""

    spread: int
    noise_multiplier: float | None  # None: no noise level lets that many rounds fit
    evaluations: int  # held-out error releases the plan makes room for (spread over the run)
    epsilon_first_round: float  # spent after the run's initial held-out error, its first round and that's
    epsilon_after_run: float  # spent after every round of the run and their held-out errors
    node_uses: bool  # the pace the node's own settings give
    declines: bool  # the noise is above privacy.max_noise_multiplier: the node sits rounds out


def _spent_after(settings: PlanSettings, history: Sequence[Mechanism], plan: NoisePlan, rounds: int) -> float:
    """Epsilon after the run's first ``rounds`` rounds and the held-out errors the node
    releases by then (its plan's room, spread over the run: ``ReleaseSchedule``)."""
    train = Mechanism(plan.noise_multiplier, settings.sample_rate, settings.local_steps)
    schedule = ReleaseSchedule.of(1, plan.rounds, plan.evaluations, settings.run_rounds)
    released = schedule.due(rounds) if schedule is not None and settings.evaluation is not None else 0
    mechanisms = [*history, *([train] * rounds), *([settings.evaluation] * released)]
    return composed_epsilon(mechanisms, settings.budget.delta, settings.accountant)


def _after_initial_release(settings: PlanSettings, history: Sequence[Mechanism]) -> list[Mechanism]:
    """The history the node plans the run with: the coordinator asks for the round-0 held-out
    error before any training, and the node releases it when it fits the budget."""
    if settings.evaluation is None:
        return list(history)
    fits, _ = evaluation_leaves_room(settings.budget, history, settings.evaluation, [], settings.accountant)
    return [*history, settings.evaluation] if fits else list(history)


def pace_rows(settings: PlanSettings, history: Sequence[Mechanism], trained: int) -> list[PaceRow]:
    """The node's own pace for the next run (from its first round) and the longer ones in ``PACES``."""
    history = _after_initial_release(settings, history)
    own = rounds_to_spread(settings.run_rounds, 1, settings.budget_rounds, trained)
    spreads = sorted({own, *(p for p in PACES if p > settings.run_rounds)})
    rows = []
    for spread in spreads:
        try:
            plan = plan_noise(
                settings.budget,
                history,
                settings.sample_rate,
                settings.local_steps,
                spread,
                accountant=settings.accountant,
                evaluation=settings.evaluation,
                max_noise_multiplier=settings.max_noise_multiplier,
            )
        except ValueError:
            spent = composed_epsilon(history, settings.budget.delta, settings.accountant)
            rows.append(PaceRow(spread, None, 0, spent, spent, spread == own, True))
            continue
        rows.append(
            PaceRow(
                spread=spread,
                noise_multiplier=plan.noise_multiplier,
                evaluations=plan.evaluations,
                epsilon_first_round=_spent_after(settings, history, plan, 1),
                epsilon_after_run=_spent_after(settings, history, plan, settings.run_rounds),
                node_uses=spread == own,
                declines=plan.noise_multiplier > settings.max_noise_multiplier,
            )
        )
    return rows


def noise_per_coordinate(noise_multiplier: float, sample_rate: float, training_episodes: int) -> float | None:
    """The noise's standard deviation on each coordinate of a step's averaged gradient, in
    clipping norms: sigma / (q N), against a mean of about q N clipped episode gradients.

    Over d trainable coordinates the noise's norm is sqrt(d) times this, while the mean
    gradient's norm is at most one clipping norm: it is the number that says whether a pace
    leaves anything to learn, and it halves when the member's episodes double or its noise
    multiplier halves. None without training episodes."""
    expected = sample_rate * training_episodes
    return noise_multiplier / expected if expected > 0 else None


# ----------------------------------------------------------------------------- command line


class PlanError(Exception):
    """A plan that cannot be made: printed as one line, exit code 2."""


def _member_state(args: argparse.Namespace) -> tuple[MemberSetup | None, list[dict[str, Any]]]:
    """The member's setup and its ledger's releases (none before the node's first round)."""
    if args.dir is None:
        return None, []
    try:
        setup = load_setup(args.dir)
    except SetupError as err:
        raise PlanError(str(err)) from None
    if not setup.dp:
        raise PlanError(f"{setup.dir / 'member.yaml'} sets dp: false: this node trains without DP, nothing to plan")
    try:
        return setup, Ledger(Path(setup.state_dir) / "ledger.jsonl").releases()
    except LedgerError as err:
        raise PlanError(f"the ledger does not verify ({err}): fix it before planning on it") from None


def _training_episodes(setup: MemberSetup | None, args: argparse.Namespace, cfg: KyodoConfig) -> int | None:
    """The member's training episodes, split as its node splits them (read here, never sent)."""
    if args.episodes is not None or setup is None:
        return args.episodes
    try:
        dataset = read_dataset(setup.data_dir, cfg.embodiments[setup.embodiment], setup.embodiment)
    except (DatasetError, KeyError) as err:
        raise PlanError(f"cannot read the member's dataset {setup.data_dir} ({err}): give --episodes N") from None
    train, _ = split_episodes(dataset.episodes, cfg.train.held_out_fraction, seed=cfg.train.seed)
    return len(train)


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value


def _settings(setup: MemberSetup | None, args: argparse.Namespace, cfg: KyodoConfig) -> PlanSettings:
    own = setup or MemberSetup(member="", embodiment="", data_dir="", state_dir="")  # a member-to-be: defaults
    # What the member pinned in member.yaml comes before the consortium's default.
    accountant = _given(args.accountant, own.accountant or cfg.privacy.accountant)
    sample_rate = _given(args.sample_rate, cfg.privacy.sample_rate)
    local_steps = _given(args.local_steps, cfg.train.local_steps)
    budget_rounds = _given(args.budget_rounds, own.budget_rounds)
    rounds = _given(args.rounds, cfg.train.rounds)
    try:
        budget = Budget(_given(args.epsilon, own.epsilon), _given(args.delta, own.delta))
        evaluation = EvalPrivacy(_given(args.eval_noise_multiplier, own.eval_noise_multiplier), own.eval_loss_bound)
        check_accountant(accountant)
        Mechanism(1.0, sample_rate, local_steps)  # a clear error for a bad rate or step count
    except ValueError as err:
        raise PlanError(str(err)) from None
    for name, value, least in (
        ("--budget-rounds", budget_rounds, 0),
        ("--episodes", _given(args.episodes, 0), 0),
        ("--rounds", rounds, 1),
        ("--local-steps", local_steps, 1),
    ):
        if value < least:
            raise PlanError(f"{name} must be >= {least}, got {value}")
    return PlanSettings(
        budget=budget,
        budget_rounds=budget_rounds,
        evaluation=evaluation.mechanism() if evaluation.enabled else None,
        accountant=accountant,
        sample_rate=sample_rate,
        local_steps=local_steps,
        run_rounds=rounds,
        max_noise_multiplier=own.max_noise_multiplier or cfg.privacy.max_noise_multiplier,
    )


def _table(rows: list[PaceRow], settings: PlanSettings, episodes: int | None, spent: float) -> Table:
    table = Table(
        title=f"the next run: {settings.run_rounds} rounds of {settings.local_steps} steps at q={settings.sample_rate:g}",
        caption=f"ε spent so far {spent:.3f} of {settings.budget.epsilon:g} "
        f"({settings.accountant.upper()}, δ={settings.budget.delta:g})",
    )
    table.add_column("budget spread over", justify="right")
    table.add_column("σ", justify="right")
    table.add_column("held-out errors in the run", justify="right")
    table.add_column("ε after round 1", justify="right")
    table.add_column(f"ε after round {settings.run_rounds}", justify="right")
    table.add_column("noise σ/(qN)" if episodes else "noise", justify="right")
    table.add_column("")
    for row in rows:
        mark = "◀ this node" if row.node_uses else ""
        if row.noise_multiplier is None:
            table.add_row(f"{row.spread} rounds", "-", "-", "-", "-", "-", f"{mark} no noise level fits: budget spent")
            continue
        noise = noise_per_coordinate(row.noise_multiplier, settings.sample_rate, episodes or 0)
        note = f"declines: σ above {settings.max_noise_multiplier:g}" if row.declines else ""
        table.add_row(
            f"{row.spread} rounds",
            f"{row.noise_multiplier:.3f}",
            _releases_cell(row, settings) if settings.evaluation is not None else "-",
            f"{row.epsilon_first_round:.3f}",
            f"{row.epsilon_after_run:.3f}",
            f"{noise:.4f}" if noise is not None else "-",
            " ".join(x for x in (mark, note) if x),
        )
    return table


def _releases_cell(row: PaceRow, settings: PlanSettings) -> str:
    """The run's share of the plan's held-out errors, and the plan's room when it spans more."""
    schedule = ReleaseSchedule.of(1, row.spread, row.evaluations, settings.run_rounds)
    in_run = schedule.releases if schedule is not None else 0
    return f"{in_run}" if row.spread <= settings.run_rounds else f"{in_run} ({row.evaluations} in {row.spread})"


def _cmd_plan(args: argparse.Namespace) -> int:
    console = Console(soft_wrap=True)
    try:
        cfg = load_config()
        setup, releases = _member_state(args)
        settings = _settings(setup, args, cfg)
        episodes = _training_episodes(setup, args, cfg)
    except (PlanError, ConfigError) as err:
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        return 2
    history = [mechanism_of(e) for e in releases]
    trained = sum(1 for e in releases if release_of(e) == RELEASE_TRAIN)
    spent = composed_epsilon(history, settings.budget.delta, settings.accountant)
    who = f"{setup.member} ({setup.embodiment})" if setup else "a new member"
    held = (
        f"{trained} training rounds and {len(releases) - trained} held-out errors in its ledger"
        if setup
        else "no ledger"
    )
    data = f"{episodes} training episodes" if episodes is not None else "episodes unknown (--episodes N)"
    console.print(
        f"{who}: budget ε={settings.budget.epsilon:g} δ={settings.budget.delta:g}; {held}; {data}", highlight=False
    )
    console.print(_table(pace_rows(settings, history, trained), settings, episodes, spent))
    pace = (
        f"budget-rounds {settings.budget_rounds} ({trained} trained)" if settings.budget_rounds else "no budget-rounds"
    )
    evaluation = (
        f"it makes room for a held-out error (noise multiplier {settings.evaluation.noise_multiplier:g}) after as "
        f"many rounds as raise σ by at most {EVALUATION_NOISE_INCREASE:.0%}, spread evenly over each run with the "
        "last at its last round, and the ε columns count them"
        if settings.evaluation
        else "no held-out error is released"
    )
    console.print(
        f"this node spreads what is left over the run's rounds or its own pace, whichever is longer ({pace}); "
        f"{evaluation}. A longer pace means more noise per round; σ/(qN) is each step's noise per gradient "
        "coordinate in clipping norms (it halves when the episodes double). Change the pace with "
        "`kyodo-member budget DIR --budget-rounds N`.",
        highlight=False,
    )
    return 0


def add_plan_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    plan = commands.add_parser(
        "plan", help="what a privacy budget buys: the noise, and the epsilon each round and run spends, by pace"
    )
    plan.add_argument("dir", type=Path, nargs="?", default=None, help="the member's directory (none: a new member)")
    plan.add_argument("--epsilon", type=float, default=None, help="plan with this epsilon instead (member.yaml's)")
    plan.add_argument("--delta", type=float, default=None, help="plan with this delta instead")
    plan.add_argument("--budget-rounds", type=int, default=None, help="plan with this pace instead")
    plan.add_argument("--eval-noise-multiplier", type=float, default=None, help="held-out error release noise")
    plan.add_argument("--episodes", type=int, default=None, help="training episodes (default: read the member's data)")
    plan.add_argument("--rounds", type=int, default=None, help="rounds the coordinator plans for the run")
    plan.add_argument("--local-steps", type=int, default=None, help="the consortium's train.local_steps")
    plan.add_argument("--sample-rate", type=float, default=None, help="the consortium's privacy.sample_rate")
    plan.add_argument(
        "--accountant",
        choices=("rdp", "prv"),
        default=None,
        help="the accountant (member.yaml's, else the consortium's)",
    )
    plan.set_defaults(handler=_cmd_plan)
