"""Variants of `train_step.py` alternating on one machine, then the tokens/s of each and their ratios.

    python benchmarks/train_step_ab.py --variant half:--max-gpu-memory-gb 61 --variant cpu:--gpu-experts none \\
        [--env cpu:KT_SOME_VAR=1] [--rounds 2] [--json FILE] -- --threads 16 --steps 3 --warmup 1

Each `--variant NAME:ARGS` is one `train_step.py` process per round with the arguments after `--` and
its own `ARGS` (optionally an environment entry `--env NAME:KEY=VALUE`). Rounds run the variants in
turn (A, B, A, B, ...), so that the host's drift over minutes hits all of them alike: separate
processes on a host differ by more than most changes, and this is how a ratio between two placements
(which cannot share one process) is measured. A variant whose process fails is reported and skipped
in that round.

Prints, per variant, the median tokens/s over every measured step of every round with its range and
the median engine time, then each variant's ratio to the first one per round (from the rounds'
medians) and their median. With `--json`, every step record (tagged `variant`, `round`) and the
summary lines.
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


def parse_variants(specs: list[str], envs: list[str]) -> dict[str, tuple[list[str], dict[str, str]]]:
    """`{name: (arguments, environment)}` from `NAME:ARGS` and `NAME:KEY=VALUE` specifications."""
    variants: dict[str, tuple[list[str], dict[str, str]]] = {}
    for spec in specs:
        name, sep, args = spec.partition(":")
        if not sep or not name or name in variants:
            raise SystemExit(f"--variant {spec!r}: give NAME:ARGS with a new NAME (e.g. half:--max-gpu-memory-gb 61)")
        variants[name] = (args.split(), {})
    for spec in envs:
        name, _, assignment = spec.partition(":")
        key, sep, value = assignment.partition("=")
        if name not in variants or not sep or not key:
            raise SystemExit(f"--env {spec!r}: give NAME:KEY=VALUE for a NAME given with --variant")
        variants[name][1][key] = value
    if len(variants) < 2:
        raise SystemExit("give at least two --variant")
    return variants


def run_once(args: list[str], env: dict[str, str]) -> list[dict] | None:
    """The measured step records of one `train_step.py` process, or None if it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "records.jsonl"
        done = subprocess.run([sys.executable, str(HERE / "train_step.py"), *args, "--json", str(out)],
                              env={**os.environ, **env}, capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            print(done.stderr[-2000:], file=sys.stderr)
            return None
        records = [json.loads(line) for line in out.read_text().splitlines()]
    return [r for r in records if r.get("kind") == "step" and not r.get("warmup")]


def summarize(steps: dict[str, dict[int, list[dict]]]) -> list[dict]:
    """Per variant: tokens/s median and range over all steps, engine seconds; then ratios to the first."""
    lines, names = [], list(steps)
    medians = {name: {rnd: statistics.median(r["tokens_per_s"] for r in recs) for rnd, recs in rounds.items() if recs}
               for name, rounds in steps.items()}
    for name, rounds in steps.items():
        every = [r for recs in rounds.values() for r in recs]
        if not every:
            lines.append({"kind": "summary", "variant": name, "steps": 0})
            continue
        tps = [r["tokens_per_s"] for r in every]
        engine = [r["engine_busy_s"] for r in every if "engine_busy_s" in r]
        lines.append({"kind": "summary", "variant": name, "steps": len(every),
                      "tokens_per_s": round(statistics.median(tps), 1), "min": min(tps), "max": max(tps),
                      "engine_s": round(statistics.median(engine), 3) if engine else None})
    base = medians[names[0]]
    for name in names[1:]:
        per_round = {rnd: round(tps / base[rnd], 3) for rnd, tps in medians[name].items() if rnd in base}
        lines.append({"kind": "ratio", "variant": name, "to": names[0], "per_round": per_round,
                      "median": round(statistics.median(per_round.values()), 3) if per_round else None})
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", default=[], help="NAME:ARGS (at least two)")
    ap.add_argument("--env", action="append", default=[], help="NAME:KEY=VALUE, an environment entry of a variant")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    opts = ap.parse_args(argv[:split])
    common = argv[split + 1:]
    variants = parse_variants(opts.variant, opts.env)
    steps: dict[str, dict[int, list[dict]]] = {name: {} for name in variants}
    records: list[dict] = []
    for rnd in range(opts.rounds):
        for name, (args, env) in variants.items():
            got = run_once([*common, *args], env)
            print(f"round {rnd + 1} {name} " + ("failed" if got is None else "done"), flush=True)
            steps[name][rnd] = got or []
            records += [{"variant": name, "round": rnd, **r} for r in got or []]
    lines = summarize(steps)
    for line in lines:
        print(json.dumps(line), flush=True)
    if opts.json:
        with open(opts.json, "w") as sink:
            sink.writelines(json.dumps(r) + "\n" for r in records + lines)
    return lines


if __name__ == "__main__":
    main()
