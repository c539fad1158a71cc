"""Reads `AB_STEPLOG` files (scripts/device/ab/sitecustomize.py) of a server's engine process:
for each burst (at least `MIN_BURST` arrivals within a second: the server's sequential warm-up
requests are not one), the steps from its first arrival until 128 of its requests have
finished their prompts: when each was scheduled, the time to the next, prefill tokens, decode
rows, prompts finished, images started, and how many of the burst had arrived by then."""

import glob
import sys

MIN_BURST = 32


def bursts(adds: list[float]) -> list[list[float]]:
    """The arrival times of each burst: runs of arrivals less than 2 s apart that hold at
    least MIN_BURST arrivals within one second of their first."""
    runs, run = [], []
    for t in sorted(adds):
        if run and t - run[-1] > 2.0:
            runs.append(run)
            run = []
        run.append(t)
    runs.append(run)
    out = []
    for run in runs:
        # the burst starts at the first arrival with MIN_BURST arrivals in the second after it
        starts = [
            i for i, t in enumerate(run) if sum(1 for u in run[i:] if u - t < 1.0) >= MIN_BURST
        ]
        if starts:
            out.append(run[starts[0] :])
    return out


def main(prefix: str, wanted: int = 128) -> None:
    for path in sorted(glob.glob(prefix + ".*")):
        events = [line.split() for line in open(path)]
        adds = [float(e[1]) for e in events if e[0] == "add"]
        steps = [(float(e[1]), *map(int, e[2:])) for e in events if e[0] == "step"]
        for b, arrivals in enumerate(bursts(adds) if adds else []):
            t0 = arrivals[0]
            marks = [arrivals[min(i, len(arrivals) - 1)] - t0 for i in (63, 127, len(arrivals) - 1)]
            print(f"== {path} burst {b + 1}: {len(arrivals)} arrivals; the 64th / 128th / last "
                  f"at {', '.join(f'{m * 1e3:.0f}' for m in marks)} ms")  # fmt: skip
            done = 0
            window = [s for s in steps if t0 <= s[0] < t0 + 30]
            for i, (t, prefill, decode, finished, images) in enumerate(window):
                done += finished
                dt = (window[i + 1][0] - t) * 1e3 if i + 1 < len(window) else float("nan")
                arrived = sum(1 for a in arrivals if a <= t)
                if prefill or finished or i < 2:  # decode-only steps: left out
                    print(f"  {(t - t0) * 1e3:8.1f} ms  next +{dt:6.1f}  prefill {prefill:5d}  "
                          f"decode {decode:3d}  finished {finished:3d} (sum {done:3d})  "
                          f"images {images:3d}  arrived {arrived:3d}")  # fmt: skip
                if done >= wanted:
                    break


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))
