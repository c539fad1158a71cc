"""The steps of an `AB_STEPLOG` file that took longer than 0.3 s (a compile, a capture, a
stall) and the log's span: `python3 scripts/device/stalls.py PREFIX`."""

import glob
import sys

for path in sorted(glob.glob(sys.argv[1] + ".*")):
    steps = [line.split() for line in open(path) if line.startswith("step")]
    times = [float(s[1]) for s in steps]
    print(f"{path}: {len(steps)} steps over {times[-1] - times[0]:.2f} s")
    for i in range(len(steps) - 1):
        if times[i + 1] - times[i] > 0.3:
            took = times[i + 1] - times[i]
            print(f"  step {i} at {times[i] - times[0]:6.2f} s took {took:.2f} s:"
                  f" prefill {steps[i][2]} decode {steps[i][3]}")  # fmt: skip
