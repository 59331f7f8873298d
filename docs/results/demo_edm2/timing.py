"""The timing table of timing.sh: steps/s of each candidate (two rounds, interleaved) and its ratio to today's demo.

python docs/results/demo_edm2/timing.py runs/timing > docs/results/demo_edm2/timing.md
"""

import json
import statistics
import sys
from pathlib import Path

root = Path(sys.argv[1])
rates: dict[str, list[float]] = {}
for budget in sorted(root.glob("*/budget.json")):
    name = budget.parent.name.rsplit("_", 1)[0]
    rates.setdefault(name, []).append(json.loads(budget.read_text())["steps_per_second"])
base = statistics.mean(rates["base"])
print("| candidate | steps/s (each round) | ratio to today's demo |")
print("|---|---|---|")
for name, values in rates.items():
    shown = " / ".join(f"{v:.2f}" for v in values)
    print(f"| {name} | {shown} | {statistics.mean(values) / base:.2f} |")
