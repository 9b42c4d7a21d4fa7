"""``simulate.py`` with a fault-injecting ClientApp (tests only): ``--faults SPEC`` first.

    python tests/faulty_simulate.py --faults raise:1:2,hang:2:2 [simulate.py flags]

The faults are fixed here, on the client side (see tests/faults.py); the production
ClientApp that simulate.py runs by default has no such hook.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from faults import faulty_client_app  # noqa: E402

import simulate  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if len(argv) < 2 or argv[0] != "--faults":
        sys.exit("usage: faulty_simulate.py --faults SPEC [simulate.py flags]")
    sys.exit(simulate.main(argv[2:], client_app=faulty_client_app(argv[1])))
