"""Plot the reward curve from a recipe's final JSON line (needs matplotlib: pip install matplotlib).

Usage: python recipes/grpo_worldpm.py --config X.yaml | tail -1 > run.json
       python recipes/plot_reward_curve.py run.json curve.png
"""

from __future__ import annotations

import json
import sys


def main(src: str, dst: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(src, encoding="utf-8") as f:
        figures = json.loads(f.read().strip().splitlines()[-1])
    curve = figures["reward_curve"]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(range(1, len(curve) + 1), curve, marker="o", linewidth=1.5)
    ax.set_xlabel("training step")
    ax.set_ylabel("mean reward (raw score)")
    ax.set_title(
        f"{figures['recipe']}: {figures['first_mean_reward']:.2f} -> {figures['last_mean_reward']:.2f}"
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
