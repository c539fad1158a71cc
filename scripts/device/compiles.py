"""Triton compiles during a run's steps: `python3 scripts/device/compiles.py PREFIX` reads the
`AB_COMPILELOG` and `AB_STEPLOG` files of one process (PREFIX.compile.PID, PREFIX.steps.PID)
and prints each compile after the last burst's first step: seconds into it, the step it fell
in (prefill tokens, decode rows), the kernel and its constants."""

import glob
import sys

for path in sorted(glob.glob(sys.argv[1] + ".steps.*")):
    pid = path.rsplit(".", 1)[1]
    steps = [line.split() for line in open(path) if line.startswith("step")]
    adds = [float(line.split()[1]) for line in open(path) if line.startswith("add")]
    t0 = adds[-256] if len(adds) >= 256 else adds[0]
    times = [float(s[1]) for s in steps]
    comps = [line.split(" ", 3) for line in open(f"{sys.argv[1]}.compile.{pid}")]
    late = [c for c in comps if float(c[1]) >= t0]
    print(f"{path}: {len(comps)} compiles, {len(late)} after the captioning's first arrival")
    for c in late:
        t = float(c[1])
        i = max([j for j, u in enumerate(times) if u <= t], default=0)
        print(f"  +{t - t0:6.2f} s step {i} (prefill {steps[i][2]} decode {steps[i][3]}) "
              f"{c[2]} {c[3].strip()[:300]}")  # fmt: skip
