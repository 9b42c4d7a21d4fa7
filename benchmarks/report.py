"""Write one benchmark's section of a Markdown report, leaving the other sections as they are."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from pathlib import Path

import torch


def machine() -> str:
    """One line naming the machine and software the numbers were measured on."""
    cpu = "CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"
    return (
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, {cpu}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def load_note(before: float) -> str:
    """How busy the machine was: the 1-minute load average before the run and at its end
    (a benchmark's own workers count too), against the number of cores."""
    return (
        f"CPU cores: {os.cpu_count()}; load average (1 min) {before:.1f} before the run, "
        f"{os.getloadavg()[0]:.1f} at its end (its own workers included)"
    )


def provenance() -> str:
    """The command that produced a section, when, and where."""
    command = "python " + " ".join(sys.argv)
    return f"Command: `{command}`  \nDate: {_dt.date.today().isoformat()}  \nMachine: {machine()}\n"


def write_section(path: str | Path, heading: str, body: str, title: str = "# Benchmarks") -> None:
    """Replace (or append) the ``## heading`` section of the Markdown file at ``path``."""
    path = Path(path)
    text = path.read_text() if path.exists() else f"{title}\n"
    lines = text.splitlines()
    marker = f"## {heading}"
    start = next((i for i, line in enumerate(lines) if line.strip() == marker), None)
    section = [marker, "", *body.strip("\n").splitlines(), ""]
    if start is None:
        lines = [*lines, "", *section]
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        lines = [*lines[:start], *section, *lines[end:]]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip("\n") + "\n")
    print(f"wrote the '{heading}' section of {path}")
