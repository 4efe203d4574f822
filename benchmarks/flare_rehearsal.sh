#!/bin/bash
# The one-machine rehearsal of docs/deployment.md, run verbatim (its bash block is extracted from
# the page), then every site's last.ckpt compared with the simulation's; every background job is
# killed by process id at the end. Needs ports 8002-8013 free and /tmp/fl absent.
#   bash benchmarks/flare_rehearsal.sh
set -u
cd "$(dirname "$0")/.."
python3 - <<'PY'
s = open("docs/deployment.md").read()
block = s[s.index("## On one machine, with loopback addresses"):].split("```bash\n", 1)[1].split("```", 1)[0]
open("/tmp/fl_block.sh", "w").write(block)
PY
start=$(date +%s)
trap 'for p in $(jobs -p); do pkill -KILL -P $p 2>/dev/null; kill -KILL $p 2>/dev/null; done' EXIT
source /tmp/fl_block.sh
echo "walkthrough wall seconds: $(( $(date +%s) - start ))"
.venv/bin/python - <<'PY'
import glob, torch
sim = torch.load(glob.glob("/tmp/fl/simulated/**/last.ckpt", recursive=True)[0], weights_only=False)
worst = 0.0
for s in range(1, 11):
    (p,) = glob.glob(f"/tmp/fl/runs-{s}/**/last.ckpt", recursive=True)
    c = torch.load(p, weights_only=False)
    d = max((c["state_dict"][k].double() - v.double()).abs().max().item() for k, v in sim["state_dict"].items())
    worst = max(worst, d)
    print(f"site {s}: rounds {c['federation']['completed_rounds']}, max |w - w_sim| = {d:.3g}")
print(f"worst over the 10 sites: {worst:.3g}; simulation rounds {sim['federation']['completed_rounds']}")
PY
