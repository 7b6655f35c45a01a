#!/usr/bin/env python
"""The op-coverage sweep (tests/op_cases.py, tests/op_sweep.py) from the command line.

    scripts/op_coverage.py                 # every case on every engine: counts, references, WRONG / RAW list
    scripts/op_coverage.py --write         # ... and rewrite README.md's generated op-coverage section
    scripts/op_coverage.py --known         # ... and print KNOWN_FAILURES entries for today's failures, to review
    scripts/op_coverage.py --cases nn.GRU torch.linalg.det    # only these cases (no --write)

The README section is generated here and checked by tests/test_op_coverage.py: never edit it by hand.
Uses the fasthess of this checkout.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import op_sweep  # noqa: E402
import torch  # noqa: E402
from op_cases import CASES  # noqa: E402
from test_op_coverage import KNOWN_FAILURES  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite the generated section of README.md")
    parser.add_argument("--known", action="store_true", help="print KNOWN_FAILURES entries for the failures")
    parser.add_argument("--cases", nargs="+", metavar="NAME", help="only these cases")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1: the models are tiny)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.write and args.cases:
        parser.error("--write needs the whole catalogue (no --cases)")
    names = args.cases or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown cases: {unknown}")

    start = time.perf_counter()
    outcomes = {}
    for i, name in enumerate(names, 1):
        outcomes[name] = op_sweep.outcomes_of(name)
        print(f"\r{i}/{len(names)} {name[:60]:60s}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    seconds = time.perf_counter() - start

    print(f"{len(names)} cases x {len(op_sweep.ENGINES)} engines in {seconds:.0f} s\n")
    print(f"| engine | {' | '.join(op_sweep.OUTCOMES)} |")
    print("|---" * (1 + len(op_sweep.OUTCOMES)) + "|")
    for engine in op_sweep.ENGINES:
        counts = collections.Counter(outcomes[n][engine].outcome for n in names)
        print(f"| {engine} | " + " | ".join(str(counts[o]) for o in op_sweep.OUTCOMES) + " |")

    refs = {n: op_sweep.reference(n) for n in names}
    print("\nReferences not computed reverse-over-reverse from torch's own ops:")
    for n, r in refs.items():
        if r.source != op_sweep.REVERSE:
            print(f"  {n}: {r.source}")
    print("\nReverse-over-reverse against finite differences of the gradient, disagreeing:")
    for n, r in refs.items():
        if r.disagreement:
            print(f"  {n}: {r.disagreement}")

    for kind in ("WRONG", "RAW"):
        print(f"\n{kind}:")
        for n in names:
            for engine in op_sweep.ENGINES:
                o = outcomes[n][engine]
                if o.outcome == kind:
                    print(f"  {n} [{engine}]: {o.detail}")
    failing = {(n, e) for n in names for e in op_sweep.ENGINES if outcomes[n][e].outcome in ("WRONG", "RAW")}
    listed = {key for key in KNOWN_FAILURES if key[0] in names}
    print("\nFailing, not in KNOWN_FAILURES:", sorted(failing - listed) or "none")
    print("In KNOWN_FAILURES, not failing (remove them):", sorted(listed - failing) or "none")
    print("\nrefused (first line):")
    for n in names:
        for engine in op_sweep.ENGINES:
            if outcomes[n][engine].outcome == "refused":
                print(f"  {n} [{engine}]: {outcomes[n][engine].detail[:200]}")
    if args.known:
        print("\nKNOWN_FAILURES = {")
        for n in names:
            for engine in op_sweep.ENGINES:
                o = outcomes[n][engine]
                if o.outcome in ("WRONG", "RAW"):
                    print(f"    ({n!r}, {engine!r}): {(o.outcome + ': ' + o.detail)[:100]!r},")
        print("}")

    if args.write:
        readme = ROOT / "README.md"
        head, _, tail = op_sweep.readme_split(readme.read_text())
        section = op_sweep.readme_section({n: op_sweep.readme_row(n, outcomes[n], KNOWN_FAILURES) for n in names})
        readme.write_text(head + section + tail)
        print(f"\nwrote the op-coverage section of {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
