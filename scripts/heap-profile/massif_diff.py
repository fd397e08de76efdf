#!/usr/bin/env python3
"""Heap growth between two massif detailed snapshots, per allocation site, divided by N
(the SAs added between them): each allocation is attributed to the first frame of ours
(`concentrator_*`) above the allocator. Usage: massif_diff.py BEFORE AFTER N"""
import collections
import re
import sys


def parse(path):
    lines = open(path).read().split("\n")
    start = next(i for i, l in enumerate(lines) if l.startswith("heap_tree=")) + 1
    stack, out = [], collections.Counter()
    for line in lines[start:]:
        m = re.match(r"^( *)n(\d+): (\d+) (.*)$", line)
        if not m:
            if line.startswith("snapshot="):
                break
            continue
        depth, children, size, desc = len(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        stack.append((depth, desc))
        if children:
            continue
        key = None
        for _, d in stack[1:]:
            frame = re.sub(r"^0x[0-9A-F]+: ", "", d)
            if "concentrator_" in frame and not frame.startswith("<alloc"):
                key = frame.split(" (")[0][:140]
                loc = re.search(r"\(([^()]*\.rs:\d+)\)\s*$", frame)
                if loc:
                    key += " @" + loc.group(1)
                break
        if key is None:
            first = stack[1][1] if len(stack) > 1 else desc
            key = "other: " + re.sub(r"^0x[0-9A-F]+: ", "", first)[:100]
        out[key] += size
    return out


def main():
    before, after, n = parse(sys.argv[1]), parse(sys.argv[2]), int(sys.argv[3])
    growth = {k: after[k] - before.get(k, 0) for k in set(before) | set(after)}
    total = sum(growth.values())
    print(f"total growth {total} B, {total / n:.0f} B per SA")
    for k, v in sorted(growth.items(), key=lambda kv: -kv[1])[:30]:
        if v > 0:
            print(f"{v / n:8.0f} B/SA  {k}")


if __name__ == "__main__":
    main()
