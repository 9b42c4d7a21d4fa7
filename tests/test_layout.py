"""The installed layout: one import name (precode_flower), a Flower-free core, console scripts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

import pytest

from precode_flower import _layout

REPO = Path(__file__).resolve().parents[1]

# Imports every module of the core (precode_flower minus the Flower glue mapped into it) in
# a fresh process, then prints what it imported of Flower.
_CORE_WALK = """
import importlib, json, pkgutil, sys
import precode_flower
from precode_flower import _layout
glue = {f"precode_flower.{name}" for name in _layout.GLUE}
names = []
for info in pkgutil.walk_packages(precode_flower.__path__, "precode_flower."):
    if info.name in glue or info.name.rpartition(".")[0] in glue:
        continue
    importlib.import_module(info.name)
    names.append(info.name)
flower = sorted(m for m in sys.modules if m == "flwr" or m.startswith("flwr."))
print(json.dumps({"modules": names, "flower": flower}))
"""


def test_the_core_imports_no_flower() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _CORE_WALK],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    walked = json.loads(proc.stdout.strip().splitlines()[-1])
    core = REPO / "precode_flower"
    expected = {
        "precode_flower." + ".".join(p.relative_to(core).with_suffix("").parts)
        for p in core.rglob("*.py")
    }
    expected = {m.removesuffix(".__init__") for m in expected} - {"precode_flower"}
    assert "precode_flower.attacks.ig" in expected and "precode_flower.task" in expected
    assert expected <= set(walked["modules"])  # every module was walked
    assert not any(m.split(".")[1] in _layout.GLUE for m in walked["modules"])
    assert walked["flower"] == []


def test_pyproject_installs_one_name_with_the_glue_inside() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    setup = project["tool"]["setuptools"]
    assert {p.split(".")[0] for p in setup["packages"]} == {"precode_flower"}
    assert setup["package-dir"] == {f"precode_flower.{g}": g for g in _layout.GLUE}
    assert set(project["project"]["scripts"]) == {
        "precode-flower-simulate",
        "precode-flower-server",
    }
    assert "py-modules" not in setup
    components = project["tool"]["flwr"]["app"]["components"]
    assert all(v.startswith("precode_flower.") for v in components.values())


def _site_dirs() -> list[str]:
    """The site-packages directories this interpreter imports from (the dependencies)."""
    here = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    found = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    return list(dict.fromkeys([*here, *found]))


_USER_CHECK = """
import json, sys
import precode_flower.strategies as ps
from precode_flower.clients.client_app import app as client_app
from precode_flower.federation.app import app as server_app
from precode_flower.strategies import Auditor, FedSGD, Observed
from precode_flower import _layout
import strategies, clients, server
print(json.dumps({
    "glue": ps.__file__,
    "strategies": strategies.__file__,
    "clients": clients.__file__,
    "server": server.__file__,
    "user_names": [strategies.USER, clients.USER, server.USER],
    "user_has_ours": hasattr(strategies, "Observed"),
    "source_root": str(_layout.source_root()),
}))
"""


@pytest.mark.slow
def test_regular_install_beside_a_users_own_strategies_clients_and_server(tmp_path) -> None:
    """``pip install .`` (not editable) into a fresh venv; the dependencies come from this
    interpreter's site-packages (a .pth), so it is quick and offline."""
    src = tmp_path / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", "docs"
        ),
    )
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "zz_base.pth").write_text("".join(d + "\n" for d in _site_dirs()))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
         str(src)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    site = Path(purelib)
    # One top-level name: the glue is inside precode_flower, nothing else is installed.
    assert (site / "precode_flower" / "strategies" / "auditor.py").is_file()
    assert (site / "precode_flower" / "federation" / "rounds.py").is_file()
    for name in ("strategies", "clients", "federation", "server.py", "simulate.py"):
        assert not (site / name).exists(), name

    # A user's app with its own strategies/, clients/ and server.py.
    user = tmp_path / "user"
    for pkg in ("strategies", "clients"):
        (user / pkg).mkdir(parents=True)
        (user / pkg / "__init__.py").write_text(f"USER = {pkg!r}\n")
    (user / "server.py").write_text("USER = 'server'\n")
    before = {p: p.read_bytes() for p in user.rglob("*.py")}
    run = subprocess.run(
        [python, "-c", _USER_CHECK], cwd=user, capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(seen["glue"]).is_relative_to(site / "precode_flower")
    assert seen["strategies"] == str(user / "strategies" / "__init__.py")
    assert seen["clients"] == str(user / "clients" / "__init__.py")
    assert seen["server"] == str(user / "server.py")
    assert seen["user_names"] == ["strategies", "clients", "server"]
    assert not seen["user_has_ours"]
    assert seen["source_root"] == "None"  # an install: no source-tree mapping
    assert {p: p.read_bytes() for p in user.rglob("*.py")} == before
    # Outside the user's directory no generic name is importable at all.
    for name in ("strategies", "clients", "server", "simulate", "federation"):
        alone = subprocess.run(
            [python, "-c", f"import {name}"], cwd=tmp_path, capture_output=True, text=True,
            env=env,
        )  # fmt: skip
        assert alone.returncode == 1 and "ModuleNotFoundError" in alone.stderr, name

    # The console scripts.
    bin_dir = env_dir / "bin"
    simulate = subprocess.run(
        [bin_dir / "precode-flower-simulate", "--transport", "flower", "--actor-queue-depth",
         "2"],
        cwd=user, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert simulate.returncode == 2
    assert simulate.stderr.startswith("precode-flower-simulate: error: --actor-queue-depth")
    server = subprocess.run(
        [bin_dir / "precode-flower-server", "--insecure"],
        cwd=user, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert server.returncode == 2
    assert server.stderr.startswith("precode-flower-server: error: --app DIR")
