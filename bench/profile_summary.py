"""Where a process spent its time, from py-spy's collapsed stacks (``--format raw``).

    python bench/profile_summary.py PROFILE.txt [--top 15]

Prints the top functions by self time (the leaf frame of each sample) and by inclusive
time (anywhere on the stack), as shares of all samples the process was on CPU.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _name(frame: str) -> str:
    """``func (file.py:123)`` -> ``func (file.py)``: all lines of a function counted together."""
    match = FRAME.match(frame)
    return f"{match.group('func')} ({match.group('file')})" if match else frame


def summarise(path: Path, top: int) -> str:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = [_name(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        self_time[frames[-1]] += n
        for name in set(frames):
            inclusive[name] += n
    out = [f"{path.name}: {total} samples"]
    for title, counter in (("self", self_time), ("inclusive", inclusive)):
        out.append(f"  top {top} by {title} time")
        for name, n in counter.most_common(top):
            out.append(f"    {100 * n / total:5.1f}%  {name}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profiles", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    for path in args.profiles:
        print(summarise(path, args.top))


if __name__ == "__main__":
    main()
