"""Submitting the app to a running SuperLink: ``python server.py`` (:func:`cli`), installed
as ``precode-flower-server``.

``python server.py --superlink HOST:PORT --root-certificates ca.pem [training flags]``
(or ``--insecure``, with a warning, for plain-text local tests) submits the app to a
running SuperLink (which runs the ServerApp) and streams its log until the run ends.
It calls ``flwr run`` with a throw-away ``FLWR_HOME`` holding a single SuperLink connection,
so no Flower config file needs editing (``--connection NAME`` uses a connection from your
own ``$FLWR_HOME/config.toml`` instead). docs/DEPLOYMENT.md shows the secure deployment
(TLS, SuperNode authentication).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from precode_flower import _layout
from precode_flower.strategies.auditor import add_audit_args, audit_run_config

from .flags import (
    OneLineParser,
    add_training_args,
    check_resumable,
    config_from_args,
    out_dir_from_args,
)

#: The Flower app that ``flwr run`` submits by default: this source tree (its pyproject.toml
#: names the components), or None for an installed package (then ``--app`` names one).
APP_DIR = _layout.source_root()


def _toml_value(v: bool | int | float | str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(v)  # a JSON string is a valid TOML basic string


def flwr_config_toml(address: str, *, insecure: bool, root_certificates: str | None) -> str:
    """A Flower ``config.toml`` with one default SuperLink connection named ``target``."""
    lines = ["[superlink]", 'default = "target"', "", "[superlink.target]"]
    lines.append(f"address = {json.dumps(address)}")
    if insecure:
        lines.append("insecure = true")
    if root_certificates:
        lines.append(f"root-certificates = {json.dumps(str(Path(root_certificates).resolve()))}")
    return "\n".join(lines) + "\n"


def _last_json(text: str) -> dict[str, Any]:
    """The last line of ``text`` that parses as a JSON object (flwr's ``--format json``)."""
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else {}
    except ValueError:
        return {}


def submit(
    run_config: dict[str, bool | int | float | str],
    *,
    superlink: str | None,
    insecure: bool = False,
    root_certificates: str | None = None,
    connection: str | None = None,
    stream: bool = True,
    app_dir: Path | None = None,
) -> tuple[int, str | None, str | None]:
    """Submit ``app_dir`` (default :data:`APP_DIR`) with ``run_config``; return (exit status,
    run id, final status).

    ``flwr run --format json`` starts the run; with ``stream`` its log is then followed
    with ``flwr log`` until the run ends, and ``flwr ls`` reports how it ended.
    """
    app_dir = app_dir or APP_DIR
    if app_dir is None:
        raise ValueError("no Flower app to submit: name the directory of its pyproject.toml")
    flwr = shutil.which("flwr") or str(Path(sys.executable).with_name("flwr"))
    with tempfile.TemporaryDirectory(prefix="precode-flwr-") as tmp:
        env = dict(os.environ)
        overrides = Path(tmp) / "run_config.toml"
        overrides.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in run_config.items()))
        if connection is None:
            home = Path(tmp) / "home"
            home.mkdir()
            (home / "config.toml").write_text(
                flwr_config_toml(
                    superlink or "", insecure=insecure, root_certificates=root_certificates
                )
            )
            env["FLWR_HOME"] = str(home)
            connection = "target"

        def flwr_cmd(*args: str, capture: bool) -> subprocess.CompletedProcess[str]:
            cmd = [flwr, *args]
            print("$", shlex.join(cmd), flush=True)
            return subprocess.run(cmd, env=env, check=False, text=True, capture_output=capture)

        started = flwr_cmd(
            "run", str(app_dir), connection, "--run-config", str(overrides), "--format", "json",
            capture=True,
        )  # fmt: skip
        run_id = _last_json(started.stdout).get("run-id")
        if started.returncode != 0 or not run_id:
            sys.stderr.write(started.stdout + started.stderr)
            return started.returncode or 1, None, None
        print(f"started run {run_id}", flush=True)
        if not stream:
            return 0, str(run_id), None
        flwr_cmd("log", str(run_id), connection, "--stream", capture=False)
        listed = flwr_cmd(
            "ls", connection, "--run-id", str(run_id), "--format", "json", capture=True
        )
        status = _run_status(_last_json(listed.stdout))
        ok = status is not None and "completed" in status
        return (0 if ok else 1), str(run_id), status


def _run_status(listing: dict[str, Any]) -> str | None:
    """The status of the single run in ``flwr ls --run-id ... --format json`` output."""
    runs = listing.get("runs") or []
    return str(runs[0].get("status")) if runs else None


def build_parser(prog: str = "server.py") -> OneLineParser:
    parser = OneLineParser(
        prog=prog,
        description="Submit the PRECODE federation to a running Flower SuperLink.",
    )
    c = parser.add_argument_group("connection")
    c.add_argument(
        "--superlink", default="127.0.0.1:9093", help="SuperLink address host:port (Control API)"
    )
    c.add_argument("--insecure", action="store_true", help="plain HTTP (no TLS)")
    c.add_argument("--root-certificates", default=None, help="CA certificate (PEM) for TLS")
    c.add_argument(
        "--connection",
        default=None,
        help="use this named connection from $FLWR_HOME/config.toml instead of --superlink",
    )
    c.add_argument("--no-stream", action="store_true", help="return after submitting")
    c.add_argument(
        "--app",
        default=None,
        metavar="DIR",
        help="the Flower app to submit, the directory of its pyproject.toml (default: this "
        "source tree)",
    )
    add_training_args(parser, default_clients=2)
    add_audit_args(parser, simulation=False)
    return parser


INSECURE_WARNING = (
    "WARNING: --insecure: traffic to the SuperLink is plain text and the SuperLink is not "
    "authenticated. Use it only for local tests; see docs/DEPLOYMENT.md for TLS."
)


def cli(argv: Sequence[str] | None = None, *, prog: str = "server.py") -> int:
    """``server.py``'s command line; returns the exit status."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    cfg = config_from_args(parser, args)
    if args.insecure and args.root_certificates:
        parser.error("--insecure and --root-certificates contradict; TLS needs only the latter")
    if not args.insecure and not args.root_certificates and args.connection is None:
        parser.error(
            "refusing to connect without TLS: give --root-certificates CA.pem (see "
            "docs/DEPLOYMENT.md), or --insecure for a plain-text local test"
        )
    if args.root_certificates and not Path(args.root_certificates).is_file():
        parser.error(f"--root-certificates: no such file {args.root_certificates}")
    app_dir = Path(args.app) if args.app else APP_DIR
    if app_dir is None:
        parser.error(
            "--app DIR: an installed precode-flower has no app of its own to submit; name a "
            "Flower app whose serverapp is precode_flower.federation.app:app"
        )
    if not (app_dir / "pyproject.toml").is_file():
        parser.error(f"--app: no pyproject.toml in {app_dir}")
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    out = out_dir_from_args(parser, args, local=False)
    if args.resume and Path(out).exists():  # the SuperLink may see another filesystem
        check_resumable(parser, cfg, out)
    run_config: dict[str, bool | int | float | str] = dict(cfg.to_config())
    # The ServerApp runs in the SuperLink's process tree: give it an absolute path.
    run_config["out-dir"] = str(out.resolve())
    run_config["resume"] = bool(args.resume)
    run_config["overwrite"] = bool(args.overwrite)
    run_config.update(audit_run_config(args))
    code, run_id, status = submit(
        run_config,
        superlink=args.superlink,
        insecure=args.insecure,
        root_certificates=args.root_certificates,
        connection=args.connection,
        stream=not args.no_stream,
        app_dir=app_dir,
    )
    if run_id and not args.no_stream:
        print(f"run {run_id}: {status or 'unknown status'}; results in {out.resolve()}")
    return code


if __name__ == "__main__":
    sys.exit(cli())


def script() -> int:
    """The ``precode-flower-server`` console script."""
    return cli(prog="precode-flower-server")
