"""How fast the spec loader refuses hostile YAML, and loads the largest input it accepts (docs/spec.md,
"Validation": every limit is reached within a second).

Inputs: "billion laughs" (nine levels of nine aliases), nesting far past the limit (flow and block), just
over the input size, more aliases than allowed; and the largest accepted inputs (just under the size and
value limits). Each is loaded `--repeat` times; the slowest time counts. Prints one JSON line: seconds per
input, and whether it was refused.

    python benchmarks/yaml_limits.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wrpo.errors import SpecError  # noqa: E402
from wrpo.pipeline.strict_yaml import MAX_ALIASES, MAX_CHARS, MAX_DEPTH, MAX_VALUES, load_yaml  # noqa: E402


def inputs() -> dict[str, str]:
    laughs = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else 'lol'}]\n" for i in range(10))
    return {
        "billion_laughs": laughs,
        "flow_nesting_100k": "a: " + "[" * 100_000 + "]" * 100_000,
        "flow_nesting_900": "a: " + "[" * 900 + "]" * 900,
        "block_nesting_500": "".join(f"{' ' * i}k{i}:\n" for i in range(500)) + " " * 500 + "v\n",
        "over_size": "a: " + "x" * MAX_CHARS + "\n",
        "too_many_aliases": "a: &a x\nb: [" + ", ".join(["*a"] * (MAX_ALIASES + 1)) + "]\n",
        "largest_accepted_size": "a: [" + ", ".join(["x" * 16] * ((MAX_CHARS - 10) // 18)) + "]\n",
        "largest_accepted_values": "a: [" + ", ".join(["x"] * (MAX_VALUES - 3)) + "]\n",
        "deepest_accepted": "a: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    out: dict[str, dict[str, object]] = {}
    for name, text in inputs().items():
        worst, refused = 0.0, None
        for _ in range(args.repeat):
            start = time.perf_counter()
            try:
                load_yaml(text, "bench.yaml")
                refused = None
            except SpecError as e:
                refused = str(e)
            worst = max(worst, time.perf_counter() - start)
        out[name] = {"seconds": round(worst, 4), "chars": len(text), "refused": refused}
    print(json.dumps({"benchmark": "yaml_limits", "repeat": args.repeat, "inputs": out}))


if __name__ == "__main__":
    main()
