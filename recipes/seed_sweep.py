"""Does a smoke recipe learn for any seed and prompt set, or for one lucky configuration?

Runs each recipe's CPU smoke config for seeds 0-4 on two prompt sets from ../shared/data and
applies one criterion: the reward must rise CLEARLY, i.e. the mean of the last quarter of
steps must exceed the mean of the first quarter by more than the first quarter's standard
deviation (across its steps). Best-of-N does not train; its criterion is that the kept
replies' mean score exceeds the mean of all replies by more than half the standard
deviation of the scores within a prompt's N replies (the expected gain of a max over N = 4
is about one such standard deviation).

Writes recipes/results/seed_sweep.json and seed_sweep.md (the per-seed table). The recorded
table was run with OMP_NUM_THREADS=1 (as the CI test runs its cells), two runs at a time.

  OMP_NUM_THREADS=1 python recipes/seed_sweep.py --jobs 2   # every recipe, seeds 0-4, both prompt sets
  python recipes/seed_sweep.py --recipes grpo_worldpm --seeds 0 1 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"

SMOKE = {
    "grpo_worldpm": "grpo_smoke.yaml",
    "rloo_worldpm": "rloo_smoke.yaml",
    "polar_grpo": "polar_grpo_smoke.yaml",
    "best_of_n": "best_of_n_smoke.yaml",
}
#: name -> (file, prompt field); POLAR needs references, so its second set also has answers.
PROMPT_SETS: dict[str, tuple[str, str]] = {
    "gsm8k_train": ("../shared/data/prompts/gsm8k_train.jsonl.gz", "question"),
    "alpaca_eval": ("../shared/data/prompts/alpaca_eval_805_instructions.jsonl", "instruction"),
    "math500": ("../shared/data/prompts/math500_test.jsonl.gz", "question"),
}
SETS_FOR = {
    "grpo_worldpm": ("gsm8k_train", "alpaca_eval"),
    "rloo_worldpm": ("gsm8k_train", "alpaca_eval"),
    "polar_grpo": ("gsm8k_train", "math500"),
    "best_of_n": ("gsm8k_train", "alpaca_eval"),
}
REFERENCE_FIELD = {"gsm8k_train": "answer", "math500": "answer"}


def judge(figures: dict[str, Any]) -> dict[str, Any]:
    """The criterion, with the numbers it used."""
    if figures["recipe"] == "best_of_n":
        # the spread selection can act on: within each prompt's N replies (not between prompts)
        spread = statistics.fmean(statistics.pstdev(row["scores"]) for row in figures["rows"])
        margin = figures["mean_score_kept"] - figures["mean_score_all"]
        return {
            "first": figures["mean_score_all"],
            "last": figures["mean_score_kept"],
            "needed": 0.5 * spread,
            "margin": margin,
            "passed": margin > 0.5 * spread,
        }
    curve = figures["reward_curve"]
    k = max(2, len(curve) // 4)
    first, last = curve[:k], curve[-k:]
    needed = statistics.stdev(first)
    margin = statistics.fmean(last) - statistics.fmean(first)
    return {
        "first": statistics.fmean(first),
        "last": statistics.fmean(last),
        "needed": needed,
        "margin": margin,
        "passed": margin > needed,
    }


def run(recipe: str, prompt_set: str, seed: int, extra: list[str]) -> dict[str, Any]:
    path, field = PROMPT_SETS[prompt_set]
    overrides = [f"seed={seed}", f"prompts={path}", f"prompt_field={field}", *extra]
    if recipe == "polar_grpo":
        overrides.append(f"reference_field={REFERENCE_FIELD[prompt_set]}")
    out = None
    if recipe == "best_of_n":
        out = Path(tempfile.mkdtemp(prefix="bon-")) / "out.jsonl"
        overrides.append(f"output={out}")
    else:
        overrides.append(f"output_dir={tempfile.mkdtemp(prefix=recipe + '-')}")
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            str(RECIPES / f"{recipe}.py"),
            "--config",
            str(RECIPES / "configs" / SMOKE[recipe]),
            *overrides,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{recipe} {prompt_set} seed {seed} failed:\n{proc.stderr[-3000:]}")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    if out is not None:
        figures["rows"] = [json.loads(line) for line in out.read_text().splitlines()]
    verdict = judge(figures)
    return {
        "recipe": recipe,
        "prompts": prompt_set,
        "seed": seed,
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in verdict.items()},
        "seconds": round(time.perf_counter() - start, 1),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| recipe | prompts | seed | first | last | margin | needed | passed | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['prompts']} | {r['seed']} | {r['first']:.3f} | {r['last']:.3f} | "
            f"{r['margin']:.3f} | {r['needed']:.3f} | {'yes' if r['passed'] else '**no**'} | {r['seconds']} |"
        )
    passed = sum(r["passed"] for r in rows)
    lines.append(f"\n{passed} of {len(rows)} runs passed.")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="*", default=list(SMOKE), choices=list(SMOKE))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    parser.add_argument("--out", default=str(RECIPES / "results" / "seed_sweep"), help="path without suffix")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = parser.parse_args()
    plan = [(r, p, s) for r in args.recipes for p in SETS_FOR[r] for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda x: run(*x, args.overrides), plan))
    for row in rows:
        print(json.dumps(row))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(rows, indent=1) + "\n")
    Path(args.out + ".md").write_text(markdown(rows))
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
