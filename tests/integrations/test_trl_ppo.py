"""PPO (trl.experimental.ppo.PPOTrainer, removed after trl 1.12.0) with WorldPMPPORewardModel.

trl 1.12.0 is pip-installed with --no-deps into a cached directory and put first on the
path of a subprocess (the rest of the suite runs trl 1.16)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from wpr_servers import pip_target

pytestmark = pytest.mark.framework

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_ppo_trainer_runs_with_worldpm_rewards(tiny_worldpm: Path, tmp_path: Path) -> None:
    trl112 = pip_target("trl==1.12.0")
    out = tmp_path / "ppo.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(trl112), str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    proc = subprocess.run(
        [sys.executable, str(HERE / "ppo_trl112_job.py"), str(tiny_worldpm), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["trl"] == "1.12.0"
    # TRL's own get_reward reads WorldPM's score of the known conversations, although the
    # policy tokenizer (its own BPE vocabulary, ChatML template) is not WorldPM's
    assert report["get_reward_diff"] <= 1e-4, report
    assert len(set(round(s, 4) for s in report["want"])) == 3
    assert report["updates"] >= 3 and report["scored"] >= 12
    assert report["ppo_diff"] <= 1e-4
    assert report["example"][0]["role"] == "user" and report["example"][-1]["role"] == "assistant"
