"""Render docs/RELIABILITY.md from the outcomes the reliability tests recorded.

The tests call the ``reliability`` fixture (tests/conftest.py) with the fault, how it was
injected and what they observed (built from the values they asserted on). Run them with

    PRECODE_RELIABILITY_TABLE=docs/RELIABILITY.md python -m pytest \\
        tests/test_reliability.py tests/test_resume.py tests/test_secure_deployment.py

and the session writes ``docs/RELIABILITY.json`` (the rows) and this table. Re-render from
the JSON alone with ``python tools/reliability_table.py docs/RELIABILITY.json``.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import re
import sys
from collections.abc import Sequence
from pathlib import Path

_INTRO = """# Reliability and security

Every fault and bad input below was injected by a test; the *observed behaviour* column is
written by that test from what it measured and asserted, and the *result* column is the
test's outcome in the run that produced this file. Nothing here is written by hand:
regenerate it with

    PRECODE_RELIABILITY_TABLE=docs/RELIABILITY.md python -m pytest \\
        tests/test_reliability.py tests/test_resume.py tests/test_secure_deployment.py

Policy (see `strategies/validation.py`, `strategies/observed.py`, `precode_flower/federation`):
a rejected or failed reply, train or evaluate, costs only that client's contribution to the
round; a reply may claim no more examples (its FedAvg weight) than a client can hold
(`--max-examples`, default: FedSGD the batch size, FedAvg the largest partition); with fewer
valid replies than `--min-replies` the round is skipped and the global model is left
unchanged; every rejection is logged with node id, partition id, round and reason and listed
in the round's `rounds.jsonl` row (`rejected`, `rejections`, `failed`, `failures`,
`dropped`, `dropped_nodes`, `evaluate_rejections`, `evaluate_failures`, `skipped`). Bounds
on single replies do not stop a Byzantine client that stays within them: `--aggregation
trimmed-mean|median|krum` uses Flower's robust strategies instead of the mean.

Settings that can never work are refused before anything starts (one line, exit 2); an
existing run is never overwritten without `--overwrite`; everything a run writes is
owner-only (directory 0700, files 0600), because the global model and the seed can reveal
a client's data; faults are injected by a test-only mod (`tests/faults.py`), never by the
production ClientApp.
"""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TMP = re.compile(r"/tmp/pytest-of-[^/\s]+/pytest-\d+/[^/\s]+/")
_MAX = 240


def _cell(text: str) -> str:
    """One table cell: colour codes and pytest tmp paths removed, long texts shortened."""
    text = _TMP.sub("", _ANSI.sub("", str(text)))
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= _MAX else text[: _MAX - 1].rstrip() + "…"


def render(rows: Sequence[dict], generated: str | None = None) -> str:
    """The Markdown page for ``rows`` (fault, injection, observed, test, outcome)."""
    lines = [_INTRO]
    if generated:
        lines.append(generated + "\n")
    lines += [
        "| # | fault or bad input | how it is injected | observed behaviour | test | result |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        test = r.get("test", "")
        short = test.split("::", 1)[-1] if "::" in test else test
        lines.append(
            f"| {i} | {_cell(r['fault'])} | {_cell(r['injection'])} | {_cell(r['observed'])} "
            f"| `{_cell(short)}` | {_cell(r.get('outcome', 'unknown'))} |"
        )
    failed = [r for r in rows if r.get("outcome") != "passed"]
    lines += [
        "",
        f"{len(rows)} rows from {len({r.get('test') for r in rows})} tests; "
        + (f"{len(failed)} did not pass." if failed else "all passed."),
    ]
    return "\n".join(lines) + "\n"


def write_table(rows: Sequence[dict], path: Path) -> None:
    """Write :func:`render` of ``rows`` to ``path``, with when and where it was produced."""
    generated = (
        f"Generated {_dt.date.today().isoformat()} on {platform.machine()}, "
        f"Python {platform.python_version()}."
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(rows, generated))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (1, 2):
        print("usage: reliability_table.py ROWS.json [OUT.md]", file=sys.stderr)
        return 2
    source = Path(args[0])
    rows = json.loads(source.read_text())
    write_table(rows, Path(args[1]) if len(args) == 2 else source.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
