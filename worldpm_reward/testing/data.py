"""Real public conversations from the project's shared data folder (``../shared/data``), for
tests, benchmarks and recipes. Nothing is downloaded: the folder is found through the
``WORLDPM_SHARED_DATA`` environment variable, or beside the working directory or the
source checkout.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import json
import os
from pathlib import Path

DATA_ENV = "WORLDPM_SHARED_DATA"


def shared_data_dir() -> Path:
    """The shared data folder: $WORLDPM_SHARED_DATA, else ``../shared/data`` beside the working
    directory or beside this source checkout. Raises FileNotFoundError naming what was tried."""
    tried = []
    if os.environ.get(DATA_ENV):
        tried.append(Path(os.environ[DATA_ENV]))
    tried += [Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[3] / "shared" / "data"]
    for path in tried:
        if (path / "preferences").is_dir():
            return path
    raise FileNotFoundError(
        f"no shared data folder found (tried {', '.join(map(str, tried))}); set {DATA_ENV}=/path/to/shared/data"
    )


def _hh_transcript(text: str) -> list[dict[str, str]] | None:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> messages, or None if malformed."""
    msgs: list[dict[str, str]] = []
    for chunk in text.split("\n\nHuman: ")[1:]:
        parts = chunk.split("\n\nAssistant: ")
        msgs.append({"role": "user", "content": parts[0].strip()})
        msgs.extend({"role": "assistant", "content": p.strip()} for p in parts[1:])
    if len(msgs) < 2 or msgs[-1]["role"] != "assistant" or any(not m["content"] for m in msgs):
        return None
    if any(a["role"] == b["role"] for a, b in itertools.pairwise(msgs)):
        return None
    return msgs


def real_conversations(
    n: int = 240, data_dir: str | os.PathLike[str] | None = None
) -> list[list[dict[str, str]]]:
    """Real conversations (multi-turn hh-rlhf, LLMBar, PandaLM, HHH), deterministic order, unique."""
    data = Path(data_dir) if data_dir is not None else shared_data_dir()
    convs: list[list[dict[str, str]]] = []
    with gzip.open(data / "preferences" / "hh_rlhf_harmless_base_test.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            for key in ("chosen", "rejected"):
                msgs = _hh_transcript(rec[key])
                if msgs:
                    convs.append(msgs)
            if len(convs) >= n * 2 // 3:
                break
    for rec in json.loads((data / "preferences" / "llmbar" / "LLMBar_Natural.json").read_text())[: n // 8]:
        for key in ("output_1", "output_2"):
            if isinstance(rec[key], str) and rec[key].strip():
                convs.append(
                    [{"role": "user", "content": rec["input"]}, {"role": "assistant", "content": rec[key]}]
                )
    for rec in json.loads((data / "preferences" / "pandalm" / "pandalm_testset-v1.json").read_text())[
        : n // 8
    ]:
        prompt = rec["instruction"] + ("\n\n" + rec["input"] if rec["input"] else "")
        for key in ("response1", "response2"):
            if isinstance(rec[key], str) and rec[key].strip():
                convs.append(
                    [{"role": "user", "content": prompt}, {"role": "assistant", "content": rec[key]}]
                )
    with open(data / "preferences" / "hhh_alignment" / "hhh_alignment_pairs.jsonl", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            convs.append(
                [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["chosen"]}]
            )
    unique = list({json.dumps(c, sort_keys=True): c for c in convs}.values())  # the sets repeat some replies
    return unique[:n]


def grpo_groups(
    n_prompts: int = 4,
    group_size: int = 8,
    prompt_chars: int = 1200,
    data_dir: str | os.PathLike[str] | None = None,
) -> list[dict[str, str]]:
    """A GRPO-shaped batch of real text: ``group_size`` replies to each of ``n_prompts`` long
    prompts (the Arena-Hard v0.1 questions closest to ``prompt_chars`` characters, about 300
    tokens by default), prompt-major.

    Replies are real model outputs from PandaLM's test set, assigned round robin, so the
    prompt is most of each sample's tokens, as in RL on long instructions.
    """
    data = Path(data_dir) if data_dir is not None else shared_data_dir()
    with gzip.open(data / "prompts" / "arena_hard_v0.1_questions.jsonl.gz", "rt", encoding="utf-8") as f:
        prompts = [json.loads(line)["prompt"] for line in f.read().split("\n") if line.strip()]
    prompts = sorted(prompts, key=lambda p: (abs(len(p) - prompt_chars), p))[:n_prompts]
    records = json.loads((data / "preferences" / "pandalm" / "pandalm_testset-v1.json").read_text())
    texts = [
        r[k] for r in records for k in ("response1", "response2") if isinstance(r[k], str) and r[k].strip()
    ]
    replies = list(dict.fromkeys(texts))  # PandaLM repeats some replies
    out = []
    for p, prompt in enumerate(prompts):
        for g in range(group_size):
            out.append({"prompt": prompt, "response": replies[(p * group_size + g) % len(replies)]})
    return out


def prompt_file(path: str | os.PathLike[str], base: str | os.PathLike[str] | None = None) -> Path:
    """A recipe's prompt file: absolute; or relative to ``base`` (the checkout); or, for a
    ``../shared/data/...`` path, under :func:`shared_data_dir` (so $WORLDPM_SHARED_DATA works
    for an installed package). Raises FileNotFoundError naming the file and what was tried."""
    given = Path(path)
    tried = [given] if given.is_absolute() else [Path(base or Path.cwd()) / given, Path.cwd() / given]
    parts = given.parts
    if not given.is_absolute() and "shared" in parts and "data" in parts:
        rest = Path(*parts[parts.index("data") + 1 :])
        with contextlib.suppress(FileNotFoundError):
            tried.append(shared_data_dir() / rest)
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"prompts: {str(path)!r} not found (tried {', '.join(map(str, tried))}); give an absolute "
        f"path (prompts=/path/to/file.jsonl) or set {DATA_ENV}=/path/to/shared/data"
    )
