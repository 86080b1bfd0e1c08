"""Fuzz the bundle reader and the receipt reader for a while (the suite runs the same targets briefly).

    .venv/bin/python scripts/fuzz.py --seconds 300 [--seed N]

Builds two devices (as the tests do), takes a real bundle and a real receipt, then damages
them at random until the time is up: bytes flipped, cut or inserted, as found on a drive or
re-signed by a legitimate key; receipt fields replaced and re-signed. Only bundlesync's own
errors may come out. Prints the number of cases and the peak RSS; exits 1 on the first other
exception (with the case that caused it).
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import build_pair, run_cli  # noqa: E402
from fuzz_targets import Mutation, Seeds, read_bundle, read_receipt_file  # noqa: E402

from bundlesync.trust.keystore import KeyStore  # noqa: E402

SPECIAL = [b"\n", b"\t", b"{", b"}", b'"h":1e400', b'"w":-1', b"\xff" * 8, b"\x00" * 64, b"[" * 5000, b"\x28\xb5\x2f\xfd"]
VALUES: list[object] = [None, True, -1, 1 << 70, 1e308, float("inf"), "", "x" * 1000, [], {}, {"a": -5},
                        {"a": "1"}, [[[]]], ["a"] * 100]


def mutations(rng: random.Random) -> list[Mutation]:
    out = []
    for _ in range(rng.randint(1, 6)):
        insert = rng.choice(SPECIAL) if rng.random() < 0.3 else rng.randbytes(rng.randint(0, 64))
        out.append(Mutation(rng.random(), rng.randint(0, 64), insert))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        (tmp / "pair").mkdir()
        pair = build_pair(tmp / "pair", users=3, logs=40)
        bundle = Path(run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb)).last_line)
        run_cli(pair.b, "import", str(bundle))
        receipt = next(pair.usb.glob("receipt-*.json"))
        seeds = Seeds(bundle.read_bytes(), receipt.read_bytes(), KeyStore(pair.a).device_key(), pair.a)
        work = tmp / "work"
        work.mkdir()
        start = time.monotonic()
        cases = 0
        while time.monotonic() - start < args.seconds:
            damage = mutations(rng)
            try:
                if rng.random() < 0.6:
                    read_bundle(seeds, damage, rng.random() < 0.7, work)
                else:
                    field = rng.choice([None, "fsic", "filter", "chain", "dataset_id", "created_at", "format"])
                    read_receipt_file(seeds, damage, field, rng.choice(VALUES), work)
            except Exception:  # noqa: BLE001 - anything but our own errors is the finding
                traceback.print_exc()
                print(f"FOUND after {cases} cases (seed {seed}): {damage!r}", file=sys.stderr)
                return 1
            cases += 1
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{cases} cases in {args.seconds:.0f} s (seed {seed}): only bundlesync errors; peak RSS {peak_mib:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
