"""`make learn`: the learning check (issue 8), written into BENCHMARKS.md and BENCHMARKS.json.

    .venv/bin/python -m bench.learn          # = python -m bench.run --only learn, then a verdict

Runs bench/bench_learn.py through bench.run (its own subprocess; the other benchmarks' rows in
BENCHMARKS.md are kept), prints the learning-check rows and exits 1 when the check failed or a
target was missed. Takes about 15-20 minutes on a 2-core CPU box (a few more the first time,
while the tiny teacher is trained).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench import run as bench_run


def main(argv=None) -> int:
    out_path = Path(bench_run.REPO / "BENCHMARKS.md")
    rc = bench_run.main(["--only", "learn", "--out", str(out_path)])
    if rc:
        return rc
    report = json.loads(out_path.with_suffix(".json").read_text())
    raw = report.get("raw", {}).get("learn", {})
    if "error" in raw:
        print(f"learning check failed ({raw['error']}):\n{raw.get('log', '')}", file=sys.stderr)
        return 1
    entries = [e for e in report.get("entries", []) if e.get("bench") == "learn"]
    for e in entries:
        verdict = {True: "met", False: "NOT met", None: "report"}[e.get("met")]
        print(f"{e['name']}: {bench_run.fmt(e['value'])} {e.get('unit', '')} (start/baseline "
              f"{bench_run.fmt(e.get('baseline'))}, ratio {bench_run.fmt(e.get('ratio'))}, "
              f"target {e['target']}: {verdict})")
    for note in raw.get("notes", []):
        print(note)
    return 1 if not entries or any(e.get("met") is False for e in entries) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
