"""The quantization table of docs/benchmarks: run ``jobs.quantize`` and copy its report there.

    python bench/quantization.py [--storage ./artifacts] [key=value ...]

Runs ``python -m jobs.quantize`` (every method on the embedded model and
../shared/data/wikitext2_valid.txt unless overridden) with ``name=qcheck``, then copies
``<storage>/reports/qcheck/quantization.md`` and ``report.json`` to
``docs/benchmarks/quantization.{md,json}``. The job itself writes only under its storage.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "benchmarks"
DEFAULTS = ["model=smollm2-135m-instruct", "methods=all", "data=../shared/data/wikitext2_valid.txt"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", default=str(REPO / "artifacts"), help="artifact root (local path or URI)")
    parser.add_argument("overrides", nargs="*", help="jobs.quantize key=value overrides")
    args = parser.parse_args()
    if "://" in args.storage:
        raise SystemExit("--storage: give a local path; this script copies the report from it")
    subprocess.run([sys.executable, "-m", "jobs.quantize", *DEFAULTS, *args.overrides, "name=qcheck",
                    f"storage={args.storage}"], cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    report = Path(args.storage) / "reports" / "qcheck"
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(report / "quantization.md", OUT / "quantization.md")
    shutil.copyfile(report / "report.json", OUT / "quantization.json")
    print(f"wrote {OUT / 'quantization.md'} and quantization.json", flush=True)


if __name__ == "__main__":
    main()
