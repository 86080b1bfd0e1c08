"""Two imports of the same bundle at the same moment on one home: one applies, the other says so.

Each run stages its own private copy of the bundle, and the "already imported" check is made
again inside the write transaction, so the run that waited for the lock finds the other's
transfer and changes nothing (exit 0), instead of both failing on a shared staging file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, Pair, dump_tables, run_cli


def start_import(home: Path, bundle: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "BUNDLESYNC_HOME"}
    env["BUNDLESYNC_HOME"] = str(home)
    return subprocess.Popen([sys.executable, "-m", "bundlesync", "import", "--no-receipt", str(bundle)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_simultaneous_imports_of_one_bundle(pair: Pair) -> None:
    bundle = Path(run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb)).last_line)
    pristine = pair.tmp / "b-pristine.sqlite3"
    shutil.copyfile(pair.b_db, pristine)
    for _ in range(3):  # the runs race; three rounds make the overlap certain to happen
        shutil.copyfile(pristine, pair.b_db)
        runs = [start_import(pair.b, bundle) for _ in range(2)]
        outputs = [run.communicate(timeout=120) for run in runs]
        errors = [err for _, err in outputs]
        assert [run.returncode for run in runs] == [0, 0], errors
        assert sum("already imported" in err for err in errors) == 1, errors
        assert sum(" records: " in err for err in errors) == 1, errors
        assert list((pair.b / "staging").iterdir()) == [], "no staged copy is left behind"
        assert dump_tables(pair.b_db) == dump_tables(pair.a_db)
