"""A/B of builds of kt_trl on one machine: a benchmark's runs alternating between them, then the
medians, spreads and ratios of every step and stage time against the first build.

    python benchmarks/ab.py --a DIR_A --b DIR_B [--build NAME=DIR ...] [--rounds 2] [--json FILE] -- --shapes qwen3 ...

Each build is a directory it is installed in (`pip install --no-deps --target DIR <source tree>`),
put first on `PYTHONPATH` for its runs (an editable install's import hook is switched off in them,
and each run checks that kt_trl came from its directory). `--a` / `--b` name builds "a" and "b";
`--build NAME=DIR` adds more (one command compares several variants with one baseline, the first).
Each build's own benchmark runs when its source tree is given (`--a-src`, `--b-src`, `--src
NAME=TREE`; default: this one). `--script` picks the benchmark: `moe_layer` (default) or
`expert_formats` (its lines per format). The arguments after `--` go to it. Every round runs each
build once, the order rotating by one build a round (A B, B A, ... for two), so that the host's
drift over minutes hits all alike; a gain is claimed only when the ranges do not overlap.

Prints one line per (shape, T, time) and build after the first: both medians over the rounds, their
min-max, and the ratio to the first build. With `--json`, every run's records (tagged `variant`,
`round`) and the summary lines.
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
SCRIPTS = ("moe_layer", "expert_formats")


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


def run_once(site: str, source: Path, args: list[str], script: str = "moe_layer") -> list[dict]:
    """One run of benchmarks/`script`.py with kt_trl from `site` ("" = the installed one); its JSON-line records."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")])))
    script = source / "benchmarks" / f"{script}.py"
    command = [sys.executable, "-c", _BOOT, site, str(script)] if site else [sys.executable, str(script)]
    run = subprocess.run([*command, *args], env=env, capture_output=True, text=True,
                         cwd=tempfile.gettempdir())  # not a source tree: the installed build is imported
    if run.returncode != 0:
        raise RuntimeError(f"{script} under {site} failed ({run.returncode}):\n{run.stderr[-2000:]}")
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def times(records: list[dict]) -> dict[tuple, float]:
    """(shape, T, what) -> ms: the step, forward and backward of each result, and every stage. The
    formats benchmark's records carry a format: its shape reads "qwen3/fp8", its step the median."""
    out = {}
    for r in records:
        key = (f"{r.get('shape')}/{r['format']}" if "format" in r else r.get("shape"), r.get("T"))
        if r.get("kind") == "result":
            out.update({(*key, name.removesuffix("_median")): r[name]
                        for name in ("step_ms", "fwd_ms", "bwd_ms", "step_ms_median") if name in r})
        elif r.get("kind") == "stages_ms":
            out.update({(*key, name): v for name, v in r.items() if name not in ("kind", "shape", "T", "format")})
    return out


def summarize(runs: dict[str, list[list[dict]]]) -> list[dict]:
    """One line per (shape, T, what) every build has and build after the first ("a" in the line):
    medians, ranges and the ratio b / a."""
    per = {v: [times(records) for records in rounds] for v, rounds in runs.items()}
    base, *others = per
    keys = [k for k in per[base][0] if all(k in t for v in per for t in per[v])]
    lines = []
    for key in keys:
        a = [t[key] for t in per[base]]
        for name in others:
            b = [t[key] for t in per[name]]
            med_a, med_b = statistics.median(a), statistics.median(b)
            lines.append({"kind": "ab", "shape": key[0], "T": key[1], "what": key[2], "a": base, "b": name,
                          "a_ms": med_a, "b_ms": med_b, "a_range": [min(a), max(a)], "b_range": [min(b), max(b)],
                          "b_over_a": round(med_b / med_a, 3) if med_a else None,
                          "separated": max(a) < min(b) or max(b) < min(a)})
    return lines


def named(pairs: list[str], what: str) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"{what} {pair!r}: expected NAME=PATH")
        if what == "--build" and (name in ("a", "b") or name in out):
            raise SystemExit(f"--build {pair!r}: the name {name!r} is taken (a and b are --a and --b)")
        out[name] = value
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, help="directory build a (the baseline) is installed in")
    ap.add_argument("--b", required=True, help="directory build b is installed in")
    ap.add_argument("--build", action="append", default=[], help="NAME=DIR: one more build (repeatable)")
    ap.add_argument("--a-src", default=str(HERE.parent), help="source tree of a (its benchmarks/)")
    ap.add_argument("--b-src", default=str(HERE.parent), help="source tree of b")
    ap.add_argument("--src", action="append", default=[], help="NAME=TREE: source tree of a --build")
    ap.add_argument("--script", choices=SCRIPTS, default="moe_layer", help="the benchmark each build runs")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    opts = ap.parse_args(argv[:split])
    bench_args = argv[split + 1:]
    sites = {"a": opts.a, "b": opts.b, **named(opts.build, "--build")}
    sources = {name: str(HERE.parent) for name in sites} | {"a": opts.a_src, "b": opts.b_src}
    extra = named(opts.src, "--src")
    if unknown := set(extra) - set(sites):
        raise SystemExit(f"--src for builds not given: {sorted(unknown)}")
    sources |= extra
    names = list(sites)
    runs: dict[str, list[list[dict]]] = {v: [] for v in names}
    records = []
    for i in range(opts.rounds):
        for v in names[i % len(names):] + names[:i % len(names)]:
            got = run_once(sites[v], Path(sources[v]), bench_args, opts.script)
            runs[v].append(got)
            records += [{"variant": v, "round": i + 1, **r} for r in got]
            print(f"round {i + 1} {v} done", file=sys.stderr, flush=True)
    lines = summarize(runs)
    for line in lines:
        print(f"{line['shape']:>10} T={line['T']:<6} {line['what']:<14} {line['a']} {line['a_ms']:9.2f} "
              f"[{line['a_range'][0]:.2f}-{line['a_range'][1]:.2f}]  {line['b']} {line['b_ms']:9.2f} "
              f"[{line['b_range'][0]:.2f}-{line['b_range'][1]:.2f}]  x{line['b_over_a']}"
              f"{'' if line['separated'] else '  (ranges overlap)'}")
    if opts.json:
        with open(opts.json, "w") as f:
            for r in records + lines:
                f.write(json.dumps(r) + "\n")
    return lines


if __name__ == "__main__":
    main()
