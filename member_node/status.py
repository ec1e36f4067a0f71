"""``kyodo-member status``: what this member has spent of its privacy budget, from its ledger.

Reads only the node's state directory (``ledger.jsonl``, ``member.json``); verifies every
signature and the hash chain before showing anything, recomputes the composed epsilon from
the recorded mechanisms, and draws epsilon over rounds against the budget as a PNG.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from member_node.node import ROLLBACK_FILE
from member_node.private_eval import release_key, released_evaluations
from member_node.release_plan import NOISE_PLAN_FILE, last_plan
from member_node.release_schedule import ReleaseSchedule
from member_node.sent_updates import MASKED, PLAIN, sent_updates
from privacy.accountant import Mechanism
from privacy.accountant import epsilon as composed_epsilon
from privacy.keys import load_public_key
from privacy.ledger import (
    RELEASE_EVALUATION,
    Ledger,
    LedgerError,
    declared_budget,
    entry_hash,
    is_release,
    release_of,
    verify_chain,
)


def _load_member(state_dir: Path) -> dict:
    path = state_dir / "member.json"
    if not path.is_file():
        raise LedgerError(f"{path}: missing (is {state_dir} a kyodo node state directory?)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LedgerError(f"{path}: not valid JSON: {err}") from None


def _unresolved_rollback(state_dir: Path, entries: list[dict]) -> str:
    """What the node saw ('' if nothing, or if the ledger now holds the entry again): the
    coordinator named a receipt of this member that the ledger lacks. The ledger alone looks
    whole after a restore from a backup, so without this the member would read a verified
    ledger with budget left while its node declines every round."""
    try:
        seen = json.loads((state_dir / ROLLBACK_FILE).read_text(encoding="utf-8"))
        missing = str(seen["missing_entry"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    if any(entry_hash(entry) == missing for entry in entries):
        return ""
    return (
        f"since {seen.get('first', '?')} (last {seen.get('last', '?')}) the coordinator has named entry "
        f"{missing[:16]}..., a receipt this member signed, "
        "which this ledger lacks (was the state directory restored from a backup?). The node declines every round "
        "and the budget above under-counts what was released: restore the ledger that holds that entry."
    )


def _released_evaluations(state_dir: Path) -> dict[str, dict]:
    """What the node sent as its held-out error (noised); {} if none was kept or the file is damaged."""
    try:
        return released_evaluations(state_dir)
    except json.JSONDecodeError:
        return {}


def ledger_rows(entries: list[dict], delta: float, accountant: str) -> list[dict]:
    """One row per entry, with epsilon recomputed from the mechanisms (not copied from the node),
    by the accountant the entry records (``accountant`` for entries that record none): a run
    that switched accountants made every earlier entry read as a mismatch."""
    rows, history = [], []
    for entry in entries:
        mech = entry["mechanism"]
        history.append(Mechanism(mech["noise_multiplier"], mech["sample_rate"], mech["steps"]))
        rows.append(
            {
                "run": entry["run"],
                "round": entry["round"],
                "release": release_of(entry),
                "shards": len(entry["shards"]),
                "steps": mech["steps"],
                "noise_multiplier": mech["noise_multiplier"],
                "sample_rate": mech["sample_rate"],
                "decision": entry["decision"],
                "epsilon_recorded": entry["epsilon"],
                "epsilon_recomputed": composed_epsilon(history, delta, entry.get("accountant", accountant)),
            }
        )
    return rows


def _runs(rows: list[dict]) -> dict[str, dict]:
    """Each run in ledger order: its number (#1 is the oldest), trainings, evaluations, rounds, epsilon after it."""
    runs: dict[str, dict] = {}
    for r in rows:
        run = runs.setdefault(r["run"], {"number": len(runs) + 1, "train": 0, "eval": 0, "rounds": []})
        run["eval" if r["release"] == RELEASE_EVALUATION else "train"] += 1
        run["rounds"].append(r["round"])
        run["epsilon_after"] = r["epsilon_recomputed"]
    return runs


RUNS_SHOWN = 10


def _runs_table(runs: dict[str, dict], title: str, every: bool) -> Table:
    shown = list(runs.items()) if every else list(runs.items())[-RUNS_SHOWN:]
    # The numbers are this ledger's: a run the node spent nothing in (sat out) has none.
    caption = "# counts the runs this ledger has entries for; the run id is the coordinator's"
    if len(shown) != len(runs):
        caption += f"; the last {len(shown)} of {len(runs)} runs (--all: every one)"
    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, collapse_padding=True)
    for col in ("#", "run", "trained", "evals", "rounds", "ε after"):
        # A long run id folds onto more lines rather than losing its end (which says which run).
        table.add_column(
            col,
            justify="left" if col in ("run", "rounds") else "right",
            no_wrap=col != "run",
            overflow="fold" if col == "run" else "ellipsis",
        )
    for name, run in shown:
        rounds = run["rounds"]
        table.add_row(
            f"#{run['number']}",
            escape(name),
            str(run["train"]),
            str(run["eval"]),
            f"{min(rounds)}-{max(rounds)}" if len(set(rounds)) > 1 else str(rounds[0]),
            f"{run['epsilon_after']:.3f}",
        )
    return table


def _sent_cell(row: dict, released: dict, sent: dict[str, str] | None) -> str:
    """What left the node for this entry: the noised held-out MSE, the update (Δ, plain or
    masked), or "-" for nothing (a round that ended before the update left)."""
    key = release_key(row["run"], row["round"])
    if row["release"] == RELEASE_EVALUATION:
        return f"{released[key]['action_mse']:.4f}" if key in released else "-"
    if sent is None:  # a node from before it noted what it sent
        return "Δ"
    return "Δ" if sent.get(key) in (PLAIN, MASKED) else "-"


def _entries_table(
    rows: list[dict], runs: dict[str, dict], released: dict, budget: float, title: str, sent: dict[str, str] | None
) -> Table:
    """One line per release; with ``runs``, a first column names each entry's run by its number
    (and "ε left" goes, to stay inside 80 columns: the line under the table says what is left)."""
    # Numbers are never cut: a budget table whose digits read "7.2…" says nothing. No
    # vertical rules and collapsed padding keep it inside 80 columns (a log, a pipe).
    table = Table(title=title, box=box.SIMPLE_HEAD, collapse_padding=True)
    # sent: what left the node, the shard update (Δ) or the noised held-out MSE
    columns = ("round", "what", "shards", "steps", "σ", "q", "decision", "ε after", "ε left", "sent")
    if runs:
        columns = ("run", *(c for c in columns if c != "ε left"))
    for col in columns:
        table.add_column(
            col,
            justify="left" if col in ("what", "decision", "sent") else "right",
            no_wrap=True,
            min_width=6 if col == "sent" else None,
        )
    for r in rows:
        evaluation = r["release"] == RELEASE_EVALUATION
        cells = {
            "run": f"#{runs[r['run']]['number']}" if runs else "",
            "round": str(r["round"]),
            "what": "eval" if evaluation else "train",
            "shards": str(r["shards"]),
            "steps": str(r["steps"]),
            "σ": f"{r['noise_multiplier']:.3f}",
            "q": f"{r['sample_rate']:.3f}",
            "decision": r["decision"],
            "ε after": f"{r['epsilon_recomputed']:.3f}",
            "ε left": f"{budget - r['epsilon_recomputed']:.3f}",
            "sent": _sent_cell(r, released, sent),
        }
        table.add_row(*(cells[col] for col in columns))
    return table


def declarations(entries: list[dict]) -> list[tuple[int, dict]]:
    """Each budget declaration with the number of releases before it, in ledger order."""
    out, releases = [], 0
    for entry in entries:
        if is_release(entry):
            releases += 1
        else:
            out.append((releases, entry))
    return out


def declared_steps(entries: list[dict]) -> list[tuple[int, float]]:
    """(releases before it, epsilon) of each budget declaration, in ledger order."""
    return [(before, declared_budget(entry)[0]) for before, entry in declarations(entries)]


def plot_epsilon(
    rows: list[dict], budget: float, member: str, path: Path, declared: Sequence[tuple[int, float]] = ()
) -> Path:
    """Epsilon spent per release against today's budget and, when the member changed it, the
    budget its ledger declared for each release."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    xs = list(range(1, len(rows) + 1))
    ax.step([0, *xs], [0.0] + [r["epsilon_recomputed"] for r in rows], where="post", label="ε spent", color="tab:blue")
    ax.plot(xs, [r["epsilon_recomputed"] for r in rows], "o", color="tab:blue", markersize=4)
    ax.axhline(budget, color="tab:red", linestyle="--", label=f"budget ε = {budget:g}")
    if len({eps for _, eps in declared}) > 1:
        # A declaration takes effect between two releases: drawn halfway, not on the marker of
        # the last release under the old budget.
        xs_declared = [at + 0.5 if at else 0 for at, _ in declared] + [len(rows)]
        ys_declared = [eps for _, eps in declared] + [declared[-1][1]]
        ax.step(xs_declared, ys_declared, where="post", color="tab:orange", label="budget declared in the ledger")
    ax.set_xlabel("releases (ledger entries: rounds trained and held-out errors reported)")
    ax.set_ylabel("ε")
    highest = max([budget, *(r["epsilon_recomputed"] for r in rows), *(eps for _, eps in declared)])
    ax.set_ylim(0, highest * 1.15)
    ax.set_title(f"{member}: privacy spent")
    ax.legend(loc="best", fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _state_dir_of(path: Path) -> Path:
    """The state directory itself, or the one a deployed member's directory (``member.yaml``,
    from ``kyodo-member init``) names: members know their directory, not where state lives."""
    from member_node.supernode import MEMBER_FILE, SetupError, load_setup

    if not (path / MEMBER_FILE).is_file():
        return path
    try:
        return Path(load_setup(path).state_dir)
    except SetupError as err:
        raise LedgerError(str(err)) from None


def _pending_budget(path: Path, member: dict) -> str:
    """'' unless ``member.yaml`` (a deployed member's directory) sets another budget than the
    one the node last ran with (``member.json``): ``kyodo-member budget`` was used and the
    node has not answered a message since its restart."""
    from member_node.supernode import MEMBER_FILE, SetupError, load_setup

    if not (path / MEMBER_FILE).is_file():
        return ""
    try:
        setup = load_setup(path)
    except SetupError:
        return ""
    running = (float(member["epsilon"]), float(member["delta"]), int(member.get("budget_rounds") or 0))
    if (setup.epsilon, setup.delta, setup.budget_rounds) == running:
        return ""
    if setup.epsilon < running[0] and (setup.delta, setup.budget_rounds) == running[1:]:
        return (
            f"member.yaml sets a lower ε={setup.epsilon:g}: the node holds to it from its next message, "
            "restarted or not"
        )
    return (
        f"member.yaml sets ε={setup.epsilon:g} δ={setup.delta:g} budget-rounds={setup.budget_rounds}; the node "
        f"takes it once restarted, at its next message: until then the above is what it runs with"
    )


def budget_history(entries: list[dict], running: tuple[float, float]) -> list[str]:
    """The budgets the ledger declared, oldest first, each with the release it came before;
    [] for a ledger that declared none (written before ledger version 4)."""
    declared = declarations(entries)
    if not declared:
        return []
    lines = ["budget declared in the signed ledger:"]
    for before, entry in declared:
        epsilon_budget, delta_budget = declared_budget(entry)
        when = entry["time"][:19].replace("T", " ")
        lines.append(f"  ε={epsilon_budget:g} δ={delta_budget:g} from release {before + 1} ({when} UTC)")
    if declared_budget(declared[-1][1]) != running:
        lines.append(f"  the node declares ε={running[0]:g} δ={running[1]:g} before its next release")
    return lines


def latest_noise_plan(state_dir: Path, entries: list[dict]) -> str:
    """The node's newest noise plan as one line ('' without one, or for a plan written before
    plans said how many held-out errors they make room for): why later releases are withheld."""
    try:
        plans = json.loads((state_dir / NOISE_PLAN_FILE).read_text(encoding="utf-8"))
        plan = last_plan(plans)
        run, rounds, first = plan["run"], int(plan["rounds"]), int(plan["first_round"])
        sigma, room = float(plan["noise_multiplier"]), int(plan["evaluations"])
    except (OSError, ValueError, IndexError, KeyError, TypeError, AttributeError):
        return ""
    released = sum(
        1
        for e in entries
        if is_release(e) and release_of(e) == RELEASE_EVALUATION and e["run"] == run and e["round"] >= first
    )
    schedule = ReleaseSchedule.in_run(plans, plan)
    if schedule is None:
        withheld = "; later ones are withheld so the training rounds still fit" if room < rounds else ""
    elif schedule.releases < schedule.rounds:
        withheld = (
            f"; {schedule.releases} of them in this run, spread over rounds {schedule.first_round}-"
            f"{schedule.last_round}, the last at its last round"
        )
    else:
        withheld = ""
    return (
        f"noise plan of run {run}: σ={sigma:.3f} over {rounds} training rounds from round {first}, with room for "
        f"{room} held-out errors beside them ({released} released since){withheld}"
    )


def _not_started(path: Path, state_dir: Path) -> str:
    """What a deployed member's directory whose node never ran says ('' for anything else): the
    member set up with `init` and asks what it has; an error about member.json would read as
    a broken state directory."""
    from member_node.supernode import MEMBER_FILE, load_setup

    if not (path / MEMBER_FILE).is_file() or any((state_dir / f).exists() for f in ("member.json", "ledger.jsonl")):
        return ""
    setup = load_setup(path)
    pace = f", spread over at least {setup.budget_rounds} training rounds" if setup.budget_rounds else ""
    return (
        f"{setup.member} ({setup.embodiment}): its node has not run yet, so nothing is spent: budget "
        f"ε={setup.epsilon:g} δ={setup.delta:g}{pace} (member.yaml); the ledger starts at its first release "
        f"(kyodo-member start {path})"
    )


def _cmd_status(args: argparse.Namespace) -> int:
    console = Console()
    try:
        path = Path(args.state_dir)
        if not path.is_dir():
            raise LedgerError(f"{path}: no such directory (the node's state directory, or the member's directory)")
        state_dir = _state_dir_of(path)
        if fresh := _not_started(path, state_dir):
            console.print(fresh, highlight=False, soft_wrap=True)
            return 0
        member = _load_member(state_dir)
        if member.get("dp") is False:
            console.print(
                f"{member['member']}: this node trains without DP (dp: false): its updates and held-out errors "
                "leave exact, nothing is accounted, and no budget holds for them; auditors read the consortium's "
                "dp: false for it as such (kyodo-member init without --no-dp sets up a member that keeps a budget)",
                highlight=False,
                soft_wrap=True,
            )
            return 0
        entries = Ledger(state_dir / "ledger.jsonl").entries()
        problems = verify_chain(entries, load_public_key(member["public_key"]))
    except (LedgerError, KeyError, ValueError) as err:
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        return 1
    budget, delta = float(member["epsilon"]), float(member["delta"])
    accountant = member.get("accountant", "rdp")
    rows = ledger_rows([e for e in entries if is_release(e)], delta, accountant)
    released = _released_evaluations(state_dir)
    sent = sent_updates(state_dir)
    runs = _runs(rows)
    title = f"{member['member']} ({member['embodiment']}): privacy ledger, budget ε={budget:g} δ={delta:g}"
    shown = rows if args.all else rows[-args.last :] if args.last > 0 else []
    if len(runs) == 1 and len(shown) == len(rows):
        console.print(_entries_table(shown, {}, released, budget, title + f", run {rows[0]['run']}", sent))
    elif rows:
        # A long-lived node has thousands of entries over many runs: a table per run, then
        # its latest entries, each labelled by the run's number in the first table.
        console.print(_runs_table(runs, title, every=args.all))
        caption = "" if len(shown) == len(rows) else f"the last {len(shown)} of {len(rows)} entries (--all: every one)"
        if shown:
            console.print(_entries_table(shown, runs, released, budget, caption, sent))
    spent = max((r["epsilon_recomputed"] for r in rows), default=0.0)  # as Ledger.spent_epsilon: the largest
    mismatched = [r for r in rows if abs(r["epsilon_recorded"] - r["epsilon_recomputed"]) > 1e-6 * max(1.0, spent)]
    verdict = "[green]verified[/]" if not problems and not mismatched else "[red]NOT verified[/]"
    console.print(
        f"ledger {verdict}: {len(rows)} entries, ε spent {spent:.3f} of {budget:g} ({accountant.upper()}, "
        f"δ={delta:g}), {budget - spent:.3f} left"
    )
    pace = int(member.get("budget_rounds") or 0)
    if pace:
        trained = sum(1 for r in rows if r["release"] != RELEASE_EVALUATION)
        console.print(
            f"pace: the budget is spread over at least {pace} training rounds (budget-rounds); "
            f"{trained} trained, {max(pace - trained, 0)} to go"
        )
    plan = latest_noise_plan(state_dir, entries)
    if plan:
        console.print(plan, highlight=False)
    for line in budget_history(entries, (budget, delta)):
        console.print(escape(line), highlight=False)
    pending = _pending_budget(Path(args.state_dir), member)
    if pending:
        console.print(f"[yellow]budget changed:[/] {escape(pending)}")
    rollback = _unresolved_rollback(state_dir, entries)
    if rollback:
        console.print(f"[bold red]ledger rolled back:[/] {escape(rollback)}")
    for problem in problems:
        console.print(f"[red]- {escape(problem)}")
    for r in mismatched:
        console.print(
            f"[red]- round {r['round']}: recorded ε {r['epsilon_recorded']} != recomputed {r['epsilon_recomputed']}"
        )
    plot = Path(args.plot) if args.plot else state_dir / "epsilon.png"
    try:
        plot_epsilon(rows, budget, member["member"], plot, declared_steps(entries))
        console.print(f"plot: {plot}")
    except OSError as err:  # a full or read-only state directory: the table above is the answer
        console.print(f"[yellow]plot not written[/]: {plot}: {err.strerror} (--plot PATH writes it elsewhere)")
    return 0 if not problems and not mismatched and not rollback else 1


def add_status_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = commands.add_parser("status", help="privacy budget spent and left, from the node's signed ledger")
    status.add_argument(
        "--state-dir",
        required=True,
        help="the node's state directory (ledger.jsonl, member.json), or a deployed member's directory "
        "(the one `kyodo-member init` made)",
    )
    status.add_argument("--plot", default="", help="where to write the PNG (default: STATE_DIR/epsilon.png)")
    status.add_argument("--last", type=int, default=20, help="how many of the latest entries to list (default 20)")
    status.add_argument("--all", action="store_true", help="list every entry and every run")
    status.set_defaults(handler=_cmd_status)
