"""The search table from the runs' metrics.json (scorer 1, the report's: autoguided) and score.py's scores.json
(both scorers, unguided and autoguided).

    python docs/results/demo_edm2/collect.py SEARCH_DIR > docs/results/demo_edm2/table.md
"""

import json
import sys
from pathlib import Path

root = Path(sys.argv[1])
scores = json.loads((root / "scores.json").read_text())
print(
    "| run | steps | scorer 1 autoguided: Frechet / confident / entropy | scorer 1 unguided: Frechet / confident | "
    "scorer 2 unguided: strict confident / precision / recall | scorer 2 autoguided: strict confident |"
)
print("|---|---|---|---|---|---|")
for metrics_file in sorted(root.glob("*_s*/metrics.json")):
    run = metrics_file.parent.name
    m = json.loads(metrics_file.read_text())
    t = m["trained"]
    unguided = scores.get(f"{run}|dpmpp_2m20", {})
    guided = scores.get(f"{run}|dpmpp_2m20-ag2", {})
    u = f"{unguided['frechet_distance']:.1f} / {unguided['confident_share']:.3f}" if unguided else ""
    s2 = (
        f"{unguided['strict_confident']:.3f} / {unguided['precision']:.3f} / {unguided['recall']:.3f}"
        if unguided
        else ""
    )
    g2 = f"{guided['strict_confident']:.3f}" if guided else ""
    print(
        f"| {run} | {m['steps']} | {t['frechet_distance']:.1f} / {t['confident_share']:.3f} / "
        f"{t['class_entropy']:.2f} | {u} | {s2} | {g2} |"
    )
real = scores.get("real_heldout")
if real:
    print(
        f"| real held-out digits | | {real['frechet_distance']:.1f} / {real['confident_share']:.3f} / "
        f"{real['class_entropy']:.2f} | | {real['strict_confident']:.3f} / {real['precision']:.3f} / "
        f"{real['recall']:.3f} | |"
    )
