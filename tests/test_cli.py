"""The worldpm-reward command line, called through main(argv)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from wpr_testutils import ReferenceWorldPM, real_conversations

from worldpm_reward.cli import main
from worldpm_reward.families import FAMILIES, KnownAnswer, known_answers_for


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.slow
def test_score_jsonl_keeps_order_count_and_fields(tmp_path: Path, tiny_worldpm: Path) -> None:
    convs = real_conversations(30)
    lines = [json.dumps({"id": i, "messages": c}) for i, c in enumerate(convs)]
    lines.insert(4, json.dumps({"id": "bad-empty", "prompt": "hi", "response": ""}))
    lines.insert(9, "{not json")
    lines.insert(
        12,
        json.dumps(
            {"id": "pr", "prompt": "Tips for better sleep?", "response": "Sleep well.", "meta": {"k": [1, 2]}}
        ),
    )
    lines.insert(15, "[1, 2]")
    src = _write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"

    assert (
        main(
            [
                "score",
                "--model",
                str(tiny_worldpm),
                "--device",
                "cpu",
                "--chunk-size",
                "7",
                str(src),
                "-o",
                str(out),
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == len(lines)
    ref = ReferenceWorldPM(tiny_worldpm)
    for line, row in zip(lines, rows):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict) or obj.get("id") == "bad-empty":
            assert row["score"] is None and row["error"].startswith("line ")
            continue
        assert {k: row[k] for k in obj} == obj  # passed through untouched
        conv = (
            obj["messages"]
            if "messages" in obj
            else [
                {"role": "user", "content": obj["prompt"]},
                {"role": "assistant", "content": obj["response"]},
            ]
        )
        assert abs(row["score"] - ref.score(conv)) <= 1e-4
    assert "line 5" in rows[4]["error"] and "'response'" in rows[4]["error"]
    assert "invalid JSON" in rows[9]["error"]

    # --strict turns any bad line into a failing exit status, output still written in full
    assert (
        main(["score", "--model", str(tiny_worldpm), "--device", "cpu", "--strict", str(src), "-o", str(out)])
        == 1
    )
    assert len(out.read_text().splitlines()) == len(lines)


def test_score_missing_model_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _write_jsonl(tmp_path / "in.jsonl", ['{"prompt": "a", "response": "b"}'])
    assert (
        main(["score", "--model", str(tmp_path / "missing"), str(src), "-o", str(tmp_path / "o.jsonl")]) == 2
    )
    assert "error:" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_offline(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "max |batch - alone|" in out and "error: sample 3" in out
    assert (tmp_path / "worldpm-reward" / "tiny-worldpm-v1" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_selftest_reports_mismatch_and_match(
    tiny_worldpm: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Pretend the tiny checkpoint were released with known answers.
    name = tiny_worldpm.name
    good, bad = (s["messages"] for s in FAMILIES["worldpm"].sanity_pair)
    ref = ReferenceWorldPM(tiny_worldpm)
    true_scores = [ref.score(good), ref.score(bad)]
    wrong = [
        KnownAnswer("a", good, true_scores[0] + 1.0),
        KnownAnswer("b", bad, true_scores[1]),
    ]
    monkeypatch.setitem(FAMILIES["worldpm"].known_answers, name, wrong)
    assert main(["selftest", "--model", str(tiny_worldpm), "--device", "cpu"]) == 1
    assert "MISMATCH" in capsys.readouterr().out

    right = [
        KnownAnswer("a", good, true_scores[0]),
        KnownAnswer("b", bad, true_scores[1]),
    ]
    monkeypatch.setitem(FAMILIES["worldpm"].known_answers, name, right)
    code = main(["selftest", "--model", str(tiny_worldpm), "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.count("[ok]") >= 2 and "MISMATCH" not in out
    # random tiny weights may or may not rank the sleep replies right: the verdict must say so honestly
    assert (code == 0) == (true_scores[0] > true_scores[1]) == ("PASSED" in out)


@pytest.mark.slow
def test_selftest_judges_an_approximate_answer_at_its_own_tolerance(
    tiny_worldpm: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A value published as "about x" (KnownAnswer.tolerance) is judged at that tolerance, not
    at --tolerance: 0.2 off an "about" value with tolerance 0.3 is a match, 0.4 off is not."""
    good, bad = (s["messages"] for s in FAMILIES["worldpm"].sanity_pair)
    ref = ReferenceWorldPM(tiny_worldpm)
    true_scores = [ref.score(good), ref.score(bad)]
    for offset, expect_match in ((0.2, True), (0.4, False)):
        answers = [
            KnownAnswer("a", good, true_scores[0] + offset, tolerance=0.3),
            KnownAnswer("b", bad, true_scores[1]),
        ]
        monkeypatch.setitem(FAMILIES["worldpm"].known_answers, tiny_worldpm.name, answers)
        main(["selftest", "--model", str(tiny_worldpm), "--device", "cpu"])
        out = capsys.readouterr().out
        assert ("MISMATCH" not in out) == expect_match, out
        assert "(tolerance 0.3)" in out


def test_known_answers_are_the_model_card_values() -> None:
    answers = known_answers_for("Qwen/WorldPM-72B")
    assert [a.score for a in answers] == [0.6298332214355469, -1.6425328254699707]
    assert answers[0].conversation[0] == {"role": "system", "content": ""}
    assert known_answers_for("/models/my-finetune") == []


@pytest.mark.slow
def test_score_streams_every_line_in_order_with_valid_json_out(tmp_path: Path, tiny_worldpm: Path) -> None:
    """Blank, non-UTF-8, NaN and lone-surrogate lines each get one output line (score null and
    an error) in place; a stale "error" in a good line is cleared; every line written is valid
    JSON in valid UTF-8; input is read as a stream (stdin that never closes early)."""
    import subprocess
    import sys

    good = {"id": 0, "prompt": "Tips for better sleep?", "response": "Keep a schedule."}
    lines: list[bytes] = [
        json.dumps(good).encode(),
        b"",  # blank
        b"   ",  # blank with spaces
        b'{"id": 3, "prompt": "q", "response": "caf\xe9"}',  # Latin-1, not UTF-8
        b'{"id": 4, "prompt": "q", "response": NaN}',
        b'{"id": 5, "prompt": "q", "response": "x\\ud800"}',  # a lone surrogate (JSON escape)
        json.dumps({**good, "id": 6, "error": "stale: from an earlier run", "score": 99}).encode(),
    ]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out.jsonl"
    rc = main(
        [
            "score",
            "--model",
            str(tiny_worldpm),
            "--device",
            "cpu",
            "--chunk-size",
            "2",
            str(src),
            "-o",
            str(out),
        ]
    )
    assert rc == 0
    raw = out.read_bytes()
    raw.decode("utf-8")  # valid UTF-8

    def strict(name: str) -> None:
        raise AssertionError(f"{name} written: not valid JSON")

    rows = [json.loads(x, parse_constant=strict) for x in raw.decode().splitlines()]  # strict JSON
    assert len(rows) == len(lines)
    assert [r["score"] is None for r in rows] == [False, True, True, True, True, True, False]
    assert "blank" in rows[1]["error"] and "line 2" in rows[1]["error"] and "line 3" in rows[2]["error"]
    assert "UTF-8" in rows[3]["error"] and "NaN" in rows[4]["error"]
    assert rows[5]["id"] == 5 and "line 6" in rows[5]["error"]
    # the same sample at two batch positions: equal within float rounding
    assert "error" not in rows[6] and abs(rows[6]["score"] - rows[0]["score"]) <= 1e-6 and rows[6]["id"] == 6

    # streamed: the first results arrive while stdin is still open
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worldpm_reward.cli",
            "score",
            "--model",
            str(tiny_worldpm),
            "--device",
            "cpu",
            "--chunk-size",
            "1",
            "-",
            "-o",
            "-",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(good).encode() + b"\n")
        proc.stdin.flush()
        first = json.loads(proc.stdout.readline())  # before stdin is closed
        assert abs(first["score"] - rows[0]["score"]) <= 1e-6
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_flags_are_server_config_fields() -> None:
    """Every ServerConfig field but the token (read from WORLDPM_REWARD_TOKEN) is a serve flag,
    the defaults give ServerConfig() exactly, and unit-scaled / 0-is-None flags convert."""
    import dataclasses

    from worldpm_reward.cli import _server_config, build_parser
    from worldpm_reward.serving.config import ServerConfig

    parser = build_parser()
    serve = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]
    dests = {a.dest for a in serve._actions}
    fields = {f.name for f in dataclasses.fields(ServerConfig)}
    assert fields - dests == {"token"}
    assert _server_config(parser.parse_args(["serve", "--model", "m"])) == ServerConfig()
    custom = _server_config(
        parser.parse_args(
            [
                "serve",
                "--model",
                "m",
                "--max-body-mb",
                "2",
                "--max-piece-tokens",
                "0",
                "--fallback-reward",
                "none",
            ]
        )
    )
    assert (
        custom.max_body_bytes == 2 * 2**20
        and custom.max_piece_tokens is None
        and custom.fallback_reward is None
    )
