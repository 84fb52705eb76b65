"""A/B of two builds of kt_trl on one machine: `moe_layer.py` runs alternating between them, then the
medians, spreads and ratios of every step and stage time.

    python benchmarks/ab.py --a DIR_A --b DIR_B [--rounds 2] [--json FILE] -- --shapes qwen3 --tokens 512 ...

`DIR_A` / `DIR_B`: where each build is installed (`pip install --no-deps --target DIR <source tree>`),
put first on `PYTHONPATH` for its runs (an editable install's import hook is switched off in them,
and each run checks that kt_trl came from its directory); each build's own `benchmarks/moe_layer.py` runs when its
source tree is given with `--a-src` / `--b-src` (default: this one). The arguments after `--` go to
`moe_layer.py`. Runs go A, B, A, B, ... (`--rounds` of each), so that the host's drift over minutes
hits both alike; a gain is claimed only when the ranges of the two do not overlap.

Prints one line per (shape, T, time): the median of A and of B over the rounds, their min–max, and B / A.
With `--json`, every run's records (tagged `variant`, `round`) and the summary lines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


# Runs a script with kt_trl imported from `site`. An editable install puts an import hook on
# sys.meta_path that answers before any path entry, PYTHONPATH included: with it in place both
# variants would run the editable tree. The hook is dropped, and the import checked, before the
# script starts.
_BOOT = """
import os, runpy, sys
site, script = sys.argv[1], sys.argv[2]
sys.argv = [script, *sys.argv[3:]]
sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("_editable")]
import kt_trl
if not os.path.realpath(kt_trl.__file__).startswith(os.path.realpath(site) + os.sep):
    sys.exit(f"kt_trl was imported from {kt_trl.__file__}, not from {site}")
runpy.run_path(script, run_name="__main__")
"""


def run_once(site: str, source: Path, args: list[str]) -> list[dict]:
    """One `moe_layer.py` run with kt_trl from `site` ("" = the installed one); its JSON-line records."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")])))
    script = source / "benchmarks" / "moe_layer.py"
    command = [sys.executable, "-c", _BOOT, site, str(script)] if site else [sys.executable, str(script)]
    run = subprocess.run([*command, *args], env=env, capture_output=True, text=True,
                         cwd=tempfile.gettempdir())  # not a source tree: the installed build is imported
    if run.returncode != 0:
        raise RuntimeError(f"{script} under {site} failed ({run.returncode}):\n{run.stderr[-2000:]}")
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def times(records: list[dict]) -> dict[tuple, float]:
    """(shape, T, what) -> ms: the step, forward and backward of each result, and every stage."""
    out = {}
    for r in records:
        key = (r.get("shape"), r.get("T"))
        if r.get("kind") == "result":
            out.update({(*key, name): r[name] for name in ("step_ms", "fwd_ms", "bwd_ms")})
        elif r.get("kind") == "stages_ms":
            out.update({(*key, name): v for name, v in r.items() if name not in ("kind", "shape", "T")})
    return out


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    """One line per (shape, T, what) both variants have: medians, ranges and the ratio B / A."""
    per = {v: [times(records) for records in rounds] for v, rounds in runs.items()}
    keys = [k for k in per["a"][0] if all(k in t for v in per for t in per[v])]
    lines = []
    for key in keys:
        a, b = ([t[key] for t in per[v]] for v in ("a", "b"))
        med_a, med_b = statistics.median(a), statistics.median(b)
        lines.append({"kind": "ab", "shape": key[0], "T": key[1], "what": key[2], "a_ms": med_a, "b_ms": med_b,
                      "a_range": [min(a), max(a)], "b_range": [min(b), max(b)],
                      "b_over_a": round(med_b / med_a, 3) if med_a else None,
                      "separated": max(a) < min(b) or max(b) < min(a)})
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, help="directory build A is installed in")
    ap.add_argument("--b", required=True, help="directory build B is installed in")
    ap.add_argument("--a-src", default=str(HERE.parent), help="source tree of A (its benchmarks/moe_layer.py)")
    ap.add_argument("--b-src", default=str(HERE.parent), help="source tree of B")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    opts = ap.parse_args(argv[:split])
    bench_args = argv[split + 1:]
    runs: dict[str, list[list[dict]]] = {"a": [], "b": []}
    records = []
    for i in range(opts.rounds):
        for v in ("a", "b"):
            got = run_once(getattr(opts, v), Path(getattr(opts, f"{v}_src")), bench_args)
            runs[v].append(got)
            records += [{"variant": v, "round": i + 1, **r} for r in got]
            print(f"round {i + 1} {v} done", file=sys.stderr, flush=True)
    lines = summarize(runs)
    for line in lines:
        print(f"{line['shape']:>6} T={line['T']:<6} {line['what']:<14} A {line['a_ms']:9.2f} "
              f"[{line['a_range'][0]:.2f}-{line['a_range'][1]:.2f}]  B {line['b_ms']:9.2f} "
              f"[{line['b_range'][0]:.2f}-{line['b_range'][1]:.2f}]  B/A {line['b_over_a']}"
              f"{'' if line['separated'] else '  (ranges overlap)'}")
    if opts.json:
        with open(opts.json, "w") as f:
            for r in records + lines:
                f.write(json.dumps(r) + "\n")
    return lines


if __name__ == "__main__":
    main()
