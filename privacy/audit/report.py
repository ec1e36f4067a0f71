"""The audit report: one self-contained HTML file (plots embedded) and a Markdown summary.

Self-contained because an audit report is an artefact people archive, attach and forward:
it must open anywhere, offline, years later, so the plots are base64 PNGs inside the HTML
and the styles are inline. Every value shown comes from the :class:`AuditResult`; nothing
is recomputed here.

Plots:

* epsilon over the ledger's entries (rounds) per member: the recorded claim, the
  independent dp-accounting recomputation and the member's published budget;
* contributions per shard per round: how many members' updates went into each shard;
* participation per member per round: contributed with a valid receipt, contributed
  without one, failed, declined or not taking part.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path

from privacy.audit.findings import CHECKS, FAIL, AuditResult, EntryRow, MemberRow

# Participation states, in legend order: (label, colour).
_STATES = {
    "ok": ("contributed, receipt valid", "#2e7d32"),
    "bad": ("contributed, receipt missing or invalid", "#c62828"),
    "trained": ("trained, no shard updated", "#a5d6a7"),
    "failed": ("reply failed", "#ef6c00"),
    "declined": ("declined", "#9e9e9e"),
    "none": ("not in the round", "#ffffff"),
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    """The figure as a base64 PNG data URI (and the figure closed)."""
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def plot_epsilon(result: AuditResult) -> str | None:
    """Per member: recorded and recomputed epsilon after each ledger entry, and the budget."""
    members = sorted({e.member for e in result.entries})
    if not members:
        return None
    plt = _pyplot()
    cols = min(2, len(members))
    rows = math.ceil(len(members) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.0 * cols, 3.2 * rows), squeeze=False)
    for ax, member in zip(axes.flat, members, strict=False):
        entries: list[EntryRow] = [e for e in result.entries if e.member == member]
        xs = list(range(1, len(entries) + 1))
        recomputed = [e.recomputed if e.recomputed is not None else float("nan") for e in entries]
        recorded = [e.recorded if e.recorded is not None else float("nan") for e in entries]
        ax.step([0, *xs], [0.0, *recomputed], where="post", color="tab:blue", label="ε recomputed (dp-accounting)")
        ax.plot(xs, recorded, "o", color="black", markersize=4, label="ε recorded")
        bad = [(x, r) for x, r, e in zip(xs, recorded, entries, strict=True) if not e.ok]
        if bad:
            ax.plot(*zip(*bad, strict=True), "x", color="tab:red", markersize=9, mew=2, label="entry fails a check")
        row = result.members.get(member)
        top = max([v for v in recomputed + recorded if v == v] or [0.0])
        if row is not None:
            ax.axhline(row.epsilon_budget, color="tab:red", linestyle="--", label=f"budget ε = {row.epsilon_budget:g}")
            top = max(top, row.epsilon_budget)
        ax.set_ylim(0, top * 1.15 or 1.0)
        ax.set_xticks(xs)
        ax.set_xticklabels([_tick(e, result.run) for e in entries], fontsize=7)
        ax.set_xlabel("ledger entries (round; * = another run)")
        ax.set_ylabel("ε")
        ax.set_title(member)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(members) :]:
        ax.axis("off")
    fig.suptitle("Privacy spent per member against its budget")
    fig.tight_layout()
    return _png(fig)


def _tick(entry: EntryRow, run: str | None) -> str:
    label = "?" if entry.round is None else str(entry.round)
    return label if run is None or entry.run == run else label + "*"


def plot_contributions(result: AuditResult) -> str | None:
    """Heatmap: contributors per shard (rows) per round (columns)."""
    rounds = [r for r in result.rounds if not r.recovered]
    shards = sorted({s for r in rounds for m in r.members.values() for s in m["shards"]})
    if not rounds or not shards:
        return None
    plt = _pyplot()
    import numpy as np

    grid = np.full((len(shards), len(rounds)), np.nan)
    for j, rnd in enumerate(rounds):
        for i, shard in enumerate(shards):
            if shard in rnd.updated_shards:
                grid[i, j] = sum(shard in m["contributed"] for m in rnd.members.values())
    top = max(1.0, float(np.nanmax(grid, initial=1.0)))
    fig, ax = plt.subplots(figsize=(max(5.0, 3.0 + 0.5 * len(rounds)), 1.0 + 0.28 * len(shards)))
    image = ax.imshow(grid, aspect="auto", cmap="Blues", vmin=0, vmax=top)
    for i in range(len(shards)):
        for j in range(len(rounds)):
            if grid[i, j] == grid[i, j]:
                colour = "white" if grid[i, j] > top / 2 else "black"
                ax.text(j, i, f"{int(grid[i, j])}", ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(len(rounds)), [str(r.round) for r in rounds])
    ax.set_yticks(range(len(shards)), shards, fontsize=7)
    ax.set_xlabel("round")
    ax.set_title("Contributions per shard per round (blank: not updated)")
    fig.colorbar(image, ax=ax, label="contributing members")
    fig.tight_layout()
    return _png(fig)


def _state(info: dict) -> str:
    if info["contributed"]:
        return "ok" if info["receipt"] == "ok" else "bad"
    return {"failed": "failed", "declined": "declined", "trained": "trained"}.get(info["state"], "none")


def plot_participation(result: AuditResult) -> str | None:
    """Member (rows) x round (columns), coloured by what the member did and its receipt's state."""
    rounds = [r for r in result.rounds if not r.recovered]
    members = sorted({m for r in rounds for m in r.members} | set(result.members))
    if not rounds or not members:
        return None
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    keys = list(_STATES)
    grid = [[keys.index(_state(r.members[m]) if m in r.members else "none") for r in rounds] for m in members]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.5 + 0.5 * len(rounds)), 1.0 + 0.35 * len(members)))
    ax.imshow(grid, aspect="auto", cmap=ListedColormap([c for _, c in _STATES.values()]), vmin=0, vmax=len(keys) - 1)
    ax.set_xticks(range(len(rounds)), [str(r.round) for r in rounds])
    ax.set_yticks(range(len(members)), members)
    ax.set_xticks([x - 0.5 for x in range(1, len(rounds))], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, len(members))], minor=True)
    ax.grid(which="minor", color="#cccccc")
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("round")
    ax.set_title("Participation per member per round")
    ax.legend(
        handles=[Patch(facecolor=c, edgecolor="#888888", label=label) for label, c in _STATES.values()],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=7,
    )
    fig.tight_layout()
    return _png(fig)


# --------------------------------------------------------------------------- text


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _check_rows(result: AuditResult) -> list[tuple[str, str, str]]:
    return [
        (name, "pass" if count == 0 else f"FAIL ({count})", CHECKS[name])
        for name, count in result.check_status().items()
    ]


PLD_DECIDED = (
    "PLD: dp-accounting's RDP bound (in brackets) is looser than the budget or the claim; the tight "
    "PLD composition of the same mechanisms decided. Both are valid upper bounds on ε."
)


RECORDED_OVER = (
    "{names}: the recomputed ε is within the budget, but the member's own signed receipts record more "
    "than its published budget (status FAIL): its node spent past what it published, by its own account."
)


RECORDED_UNDER_RDP = (
    "{names}: ε recorded is below the recomputed RDP bound because the member's node accounts with PRV, "
    "a tighter accountant; each of its entries' claims was checked against the tight PLD composition."
)


def entries_head(result: AuditResult) -> str:
    return "entries" if result.ledgers_only else "entries (run / all)"


def entries_cell(result: AuditResult, member: MemberRow) -> str:
    """'this run's / all' entries of a member; all of them in an audit of ledgers alone."""
    return str(member.entries) if result.ledgers_only else f"{member.run_entries} / {member.entries}"


def member_notes(result: AuditResult) -> list[str]:
    """What a reader of the members table needs to read it right (a walkthrough read
    "within budget: yes" beside FAIL as the audit contradicting itself)."""
    notes = [PLD_DECIDED] if any(m.method == "pld" for m in result.members.values()) else []
    over = sorted(
        name
        for name, m in result.members.items()
        if m.within_budget and m.epsilon_recorded is not None and m.epsilon_recorded > m.epsilon_budget
    )
    if over:
        notes.append(RECORDED_OVER.format(names=", ".join(over)))
    prv = {e.member for e in result.entries if e.accountant == "prv"}
    under = sorted(
        name
        for name, m in result.members.items()
        if name in prv
        and m.method == "rdp"
        and m.epsilon_recorded is not None
        and m.epsilon_recomputed is not None
        and m.epsilon_recorded < m.epsilon_recomputed
    )
    if under:
        notes.append(RECORDED_UNDER_RDP.format(names=", ".join(under)))
    return notes


def _member_head(result: AuditResult) -> list[str]:
    return ["member", "budget ε / δ", entries_head(result), "ε recorded", "ε recomputed", "within budget", "status"]


def _member_rows(result: AuditResult) -> list[list[str]]:
    rows = []
    for name, m in sorted(result.members.items()):
        rdp = "" if m.method == "rdp" or m.epsilon_rdp is None else f" (RDP {m.epsilon_rdp:.4f})"
        rows.append(
            [
                name,
                f"{m.epsilon_budget:g} / {m.delta_budget:g}",
                entries_cell(result, m),
                _fmt(m.epsilon_recorded),
                f"{_fmt(m.epsilon_recomputed)} {m.method.upper()}{rdp}",
                "yes" if m.within_budget else "NO",
                "ok" if m.ok else "FAIL",
            ]
        )
    return rows


_ENTRY_HEAD = [
    "member",
    "#",
    "run",
    "round",
    "steps",
    "σ",
    "q",
    "acct.",
    "δ",
    "ε recorded",
    "ε recomputed",
    "ok",
    "status",
]


def _entry_cells(e: EntryRow) -> list[str]:
    return [
        e.member,
        str(e.index),
        e.run,
        "-" if e.round is None else str(e.round),
        "-" if e.steps is None else str(e.steps),
        _fmt(e.noise_multiplier, 3),
        _fmt(e.sample_rate, 3),
        e.accountant,
        "-" if e.delta is None else f"{e.delta:g}",
        _fmt(e.recorded),
        f"{_fmt(e.recomputed)} {e.method.upper()}",
        "yes" if e.ok else "NO",
        e.status,
    ]


def _html_table(head: Sequence[str], rows: Sequence[Sequence[str]], bad_col: int | None = None) -> str:
    out = ["<table><thead><tr>", *(f"<th>{html.escape(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for row in rows:
        bad = bad_col is not None and row[bad_col] in ("NO", "FAIL") or any(str(c).startswith("FAIL") for c in row)
        out.append(f"<tr class='{'bad' if bad else ''}'>")
        out += [f"<td>{html.escape(str(c))}</td>" for c in row]
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{margin-bottom:.2em} .verdict{font-size:1.3em;font-weight:bold;padding:.5em 1em;border-radius:6px;display:inline-block}
.pass{background:#e8f5e9;color:#1b5e20} .failv{background:#ffebee;color:#b71c1c}
table{border-collapse:collapse;margin:1em 0;font-size:.85em} th,td{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f5f5f5} tr.bad td{background:#fff0f0} .muted{color:#777} code{font-size:.9em}
li.fail{color:#b71c1c} li.note{color:#555} img{max-width:100%;border:1px solid #eee;margin:.5em 0}
"""


def render_html(result: AuditResult) -> str:
    """The whole report as one HTML document (no external resources)."""
    verdict = "PASS: every check holds" if result.ok else f"FAIL: {len(result.failures)} problem(s)"
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>kyodo privacy audit: {html.escape(result.scope)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Privacy audit of {html.escape(result.scope) if result.ledgers_only else f'run <code>{html.escape(str(result.run))}</code>'}</h1>",
        f"<p class='muted'>kyodo-audit, {now}. Trusted: the consortium file's public keys and budgets, and "
        "mathematics (Ed25519, SHA-256, Google's dp-accounting).</p>",
        f"<div class='verdict {'pass' if result.ok else 'failv'}'>{html.escape(verdict)}</div>",
        "<h2>Inputs</h2><ul>",
        f"<li>ledgers: <code>{html.escape(result.ledgers_dir)}</code></li>",
        (
            "<li>run directory: none (ledgers only: receipts, coverage and store not checked)</li>"
            if result.ledgers_only
            else f"<li>run directory: <code>{html.escape(result.run_dir)}</code> (store HEAD at round "
            f"{result.head_round}, {result.objects_verified} objects verified)</li>"
        ),
        f"<li>consortium: <code>{html.escape(result.consortium)}</code></li></ul>",
        "<h2>Checks</h2>",
        _html_table(["check", "result", "what it establishes"], _check_rows(result)),
        "<h2>Members</h2>",
        _html_table(_member_head(result), _member_rows(result), bad_col=6),
        *(f"<p>{html.escape(note)}</p>" for note in member_notes(result)),
        "<h2>Findings</h2>",
    ]
    if result.findings:
        parts.append("<ul>")
        for f in result.findings:
            parts.append(
                f"<li class='{f.severity}'><b>{html.escape(f.severity.upper())}</b> [{html.escape(f.check)}] "
                f"{html.escape(f.text())}</li>"
            )
        parts.append("</ul>")
    else:
        parts.append("<p>None.</p>")
    for title, image in (
        ("Privacy spent per member", plot_epsilon(result)),
        ("Contributions per shard per round", plot_contributions(result)),
        ("Participation per member per round", plot_participation(result)),
    ):
        if image is not None:
            parts.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='{image}'>")
    parts += [
        "<h2>Ledger entries</h2>",
        "<p class='muted'>ε recomputed: dp-accounting composition of the entry's mechanism and every one before it "
        "in the ledger (RDP for rdp entries, PLD for prv entries and for claims the RDP check does not settle).</p>",
        _html_table(_ENTRY_HEAD, [_entry_cells(e) for e in result.entries], bad_col=11),
        "</body></html>",
    ]
    return "".join(parts)


def _md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(value: str) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(result: AuditResult, html_name: str = "report.html") -> str:
    """A short summary for a pull request, an e-mail or a ticket; details live in the HTML."""
    verdict = "**PASS**: every check holds" if result.ok else f"**FAIL**: {len(result.failures)} problem(s)"
    notes = [f for f in result.findings if f.severity != FAIL]
    lines = [
        f"# Privacy audit of {result.scope if result.ledgers_only else f'run `{result.run}`'}",
        "",
        verdict,
        "",
        (
            "Ledgers only: receipts, coverage and store not checked. "
            if result.ledgers_only
            else f"Store HEAD at round {result.head_round}, {result.objects_verified} objects verified. "
        )
        + f"Full report with plots: [{html_name}]({html_name}).",
        "",
        "## Checks",
        "",
        _md_table(["check", "result", "what it establishes"], _check_rows(result)),
        "",
        "## Members",
        "",
        _md_table(_member_head(result), _member_rows(result)),
        "",
        *(line for note in member_notes(result) for line in (note, "")),
    ]
    if result.failures:
        lines += ["## Problems", ""] + [f"- [{f.check}] {f.text()}" for f in result.failures] + [""]
    if notes:
        lines += ["## Notes", ""] + [f"- [{f.check}] {f.text()}" for f in notes] + [""]
    return "\n".join(lines)


def write_report(result: AuditResult, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(render_html(result), encoding="utf-8")
    md_path.write_text(render_markdown(result, html_path.name), encoding="utf-8")
    return html_path, md_path
