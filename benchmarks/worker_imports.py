"""What a Ray worker pays to import mlpgrid before its trial starts.

    python benchmarks/worker_imports.py                       # the worker's module, 5 fresh processes
    python benchmarks/worker_imports.py --module mlpgrid.execution.runner --repeats 9 --json imports.json

Ray hands a worker its trial function by reference, so the worker process imports the module
that defines it (and everything that module imports) before it trains. Each repeat imports
that module in a fresh interpreter and reports the wall time of the import, how many modules
it loaded, and whether SciPy or matplotlib came with it (they are the frontier's and the
figures' libraries, not a trial's). The slowest top-level packages of the last repeat come
from ``python -X importtime``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The module holding the function every Ray worker runs (mlpgrid.execution.ray_tune._run_group).
WORKER_MODULE = "mlpgrid.execution.ray_tune"
HEAVY = ("scipy", "matplotlib")

_PROBE = """
import sys, time
started = time.perf_counter()
import {module}
seconds = time.perf_counter() - started
print(repr((seconds, len(sys.modules), sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))))
"""


def measure(module: str) -> tuple[float, int, list[str]]:
    probe = _PROBE.format(module=module, heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    return eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 - our own probe's repr


def slowest_packages(module: str, count: int = 8) -> list[tuple[str, float]]:
    """Cumulative import time of each top-level package, from ``-X importtime`` (self times summed)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], cwd=REPO,
                         capture_output=True, text=True, check=True)  # fmt: skip
    totals: dict[str, float] = defaultdict(float)
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _, name = (part.strip() for part in line.removeprefix("import time:").split("|"))
        totals[name.strip().split(".")[0]] += int(self_us) / 1e6
    return sorted(totals.items(), key=lambda kv: -kv[1])[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--module", default=WORKER_MODULE, help="module the worker imports")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    runs = [measure(args.module) for _ in range(args.repeats)]
    seconds = [s for s, _, _ in runs]
    _, modules, heavy = runs[-1]
    packages = slowest_packages(args.module)
    print(f"import {args.module}: median {statistics.median(seconds):.2f} s (min {min(seconds):.2f}, "
          f"max {max(seconds):.2f}, {args.repeats} fresh processes), {modules} modules loaded")  # fmt: skip
    print(f"SciPy / matplotlib loaded: {', '.join(heavy) or 'neither'}")
    print("slowest packages (self time summed): " + ", ".join(f"{name} {s:.2f} s" for name, s in packages))
    if args.json:
        args.json.write_text(json.dumps({
            "module": args.module, "seconds": seconds, "median_s": statistics.median(seconds), "modules": modules,
            "heavy_loaded": heavy, "slowest_packages": packages,
        }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
