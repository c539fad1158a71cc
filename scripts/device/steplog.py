"""Reads `AB_STEPLOG` files (scripts/device/ab/sitecustomize.py) of a server's engine process:
for each burst (arrivals more than 2 s after the previous), the steps from its first arrival
until 128 of its requests have finished their prompts: when each was scheduled, the time to
the next, prefill tokens, decode rows, prompts finished, images started."""

import glob
import sys


def main(prefix: str, wanted: int = 128) -> None:
    for path in sorted(glob.glob(prefix + ".*")):
        events = [line.split() for line in open(path)]
        adds = [float(e[1]) for e in events if e[0] == "add"]
        steps = [(float(e[1]), *map(int, e[2:])) for e in events if e[0] == "step"]
        if not adds:
            continue
        starts = [t for i, t in enumerate(adds) if i == 0 or t - adds[i - 1] > 2.0]
        for b, t0 in enumerate(starts):
            arrivals = [t for t in adds if t0 <= t < t0 + 30]
            marks = [
                arrivals[min(i, len(arrivals) - 1)] - t0 for i in (0, 63, 127, len(arrivals) - 1)
            ]
            print(f"== {path} burst {b + 1}: {len(arrivals)} arrivals; the 1st / 64th / 128th / "
                  f"last at {', '.join(f'{m * 1e3:.0f}' for m in marks)} ms")  # fmt: skip
            done = 0
            window = [s for s in steps if s[0] >= t0 and s[0] < t0 + 30]
            for i, (t, prefill, decode, finished, images) in enumerate(window):
                done += finished
                dt = (window[i + 1][0] - t) * 1e3 if i + 1 < len(window) else float("nan")
                print(f"  {(t - t0) * 1e3:8.1f} ms  next +{dt:6.1f}  prefill {prefill:5d}  "
                      f"decode {decode:3d}  finished {finished:3d} (sum {done:3d})  "
                      f"images {images:3d}")  # fmt: skip
                if done >= wanted:
                    break


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))
