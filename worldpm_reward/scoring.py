"""The public scoring verb: a batch of conversations in, one raw reward per conversation out.

:class:`RewardModel` validates and encodes every sample (a bad sample becomes an error
result, the others are still scored), sorts the rest by length into token-budgeted
micro-batches (little padding), runs them under ``torch.inference_mode`` and reads each
score at the sequence's true last token (from lengths, never from the pad id). Samples that
start with the same long run of token ids (a GRPO group's prompt) run that prefix once,
through the KV cache. A sample scores the same alone as in any batch (within float
rounding), and results come back in input order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from worldpm_reward.batching import plan_batches, plan_shared_prefixes
from worldpm_reward.config import ModelConfig
from worldpm_reward.errors import BatchScoringError, ConfigError, SampleError
from worldpm_reward.families import RewardFamily, get_family, load
from worldpm_reward.formatting import Encoded, Encoder
from worldpm_reward.policy_text import without_reasoning
from worldpm_reward.pooling import encode_prefixes, score_after_prefixes
from worldpm_reward.samples import SampleLike, Scorer, ScoreResult, finite_or_error, parse_sample

logger = logging.getLogger(__name__)

__all__ = ["ENGINES", "BatchStats", "RewardModel", "Scorer"]


@dataclass
class BatchStats:
    """Counters of the last ``score_detailed`` call (for logging and benchmarks)."""

    num_samples: int = 0
    num_errors: int = 0
    num_truncated: int = 0
    num_batches: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0  # positions computed, padding included
    shared_groups: int = 0  # groups whose common prefix ran once
    shared_prefix_tokens: int = 0  # prefix positions NOT computed thanks to that

    @property
    def padding_fraction(self) -> float:
        return 0.0 if self.padded_tokens == 0 else 1.0 - self.real_tokens / self.padded_tokens


#: What one extra forward call costs, in FLOPs of model compute it could have done instead
#: (a CPU call's fixed cost is ~1-4 ms of Python and dispatch, a GPU call's ~1 ms of launches).
FORWARD_CALL_OVERHEAD_FLOPS = {"cpu": 2e8, "gpu": 5e11}


def auto_min_shared_prefix(model: Any, on_gpu: bool) -> int:
    """The shortest prefix worth sharing: 32 tokens, or as many as it takes for the skipped
    compute (2 FLOPs per non-embedding parameter per token) to pay for the extra forward
    call that sharing needs. Toy models (hidden 32) get a bound no prefix reaches."""
    params = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name)
    overhead = FORWARD_CALL_OVERHEAD_FLOPS["gpu" if on_gpu else "cpu"]
    return max(32, math.ceil(overhead / max(2 * params, 1)))


#: Engines other than transformers, by ``ModelConfig.engine`` name: RewardModel subclasses whose
#: ``from_pretrained(path, config)`` builds them. Each engine module registers itself here;
#: the package imports them (``worldpm_reward.engines``), so this module needs none of them.
ENGINES: dict[str, type[RewardModel]] = {}


class RewardModel:
    """A loaded reward model that scores conversations in token-budgeted batches.

    Build it with :meth:`from_pretrained`. Scores are the model's RAW outputs: for WorldPM
    an unbounded Bradley-Terry logit where higher means more preferred and a difference
    of d between two replies means P(first preferred) = sigmoid(d).

    The batching arguments are those of :meth:`from_pretrained`.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        family: str | RewardFamily,
        config: ModelConfig | None = None,
        name: str = "",
        **options: Any,
    ) -> None:
        self.model: Any = model  # a transformers PreTrainedModel
        spec = family if isinstance(family, RewardFamily) else get_family(family)
        self._init_front(tokenizer, spec, model.config, (config or ModelConfig()).replace(**options), name)
        on_gpu = self.device.type == "cuda"
        cfg = self.config
        self.max_batch_tokens = int(cfg.max_batch_tokens or (32768 if on_gpu else 4096))
        self.max_batch_size = cfg.max_batch_size
        self.min_shared_group = int(cfg.min_shared_group or (8 if on_gpu else 2))
        self.min_shared_prefix = int(cfg.min_shared_prefix or auto_min_shared_prefix(model, on_gpu))
        self.max_padding_fraction = float(
            cfg.max_padding_fraction if cfg.max_padding_fraction is not None else (0.3 if on_gpu else 0.05)
        )
        self._forward = self.family_spec.forward_fn(model)
        self._prefix_parts = self.family_spec.parts(model) if self._can_share_prefix() else None
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else (self.encoder.final_token_id or 0))

    def _init_front(
        self,
        tokenizer: Any,
        family: RewardFamily,
        hf_config: Any,
        config: ModelConfig,
        name: str,
        encoder: Encoder | None = None,
    ) -> None:
        """What every engine holds: the family, its encoder (input format, truncation), config."""
        self.tokenizer = tokenizer
        self.family_spec = family
        self.family = family.name
        self.config = config
        self.name = name
        self.encoder: Encoder = encoder or family.encoder(tokenizer, hf_config, config)
        self.max_length = self.encoder.max_length
        self.last_stats = BatchStats()

    def _can_share_prefix(self) -> bool:
        """Shared-prefix scoring is exact only where positions are plain offsets: dynamic RoPE
        rescales with the sequence length once it passes the trained context."""
        if not self.config.shared_prefix:
            return False
        hf = self.model.config
        rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
        limit = getattr(hf, "max_position_embeddings", None) or 0
        return not (rope.get("rope_type", rope.get("type")) == "dynamic" and self.max_length > limit)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike[str], config: ModelConfig | None = None, **options: Any
    ) -> RewardModel:
        """Load a reward model checkpoint (a hub id or a local directory).

        ``options`` are :class:`~worldpm_reward.config.ModelConfig` fields (or pass a whole
        ``config``; options override it): ``family`` ("auto", "worldpm", "polar", "generic"),
        ``dtype`` ("auto" = bf16 on GPU, fp32 on CPU), ``device``, ``device_map`` ("auto"
        shards WorldPM-72B over the visible GPUs), ``attn_implementation``, ``max_length``,
        ``overflow``, ``max_batch_tokens``, ``max_batch_size``, ``max_padding_fraction``,
        ``trust_remote_code`` (off; WorldPM never needs it), ``chat_template``, ``revision``,
        ``token``; ``engine="vllm"`` (with ``vllm_url`` / ``vllm_python`` / ``vllm_args``) has
        vLLM run the forward pass (:mod:`worldpm_reward.engines.vllm_engine`). An unknown
        option is a TypeError naming the known ones.
        """
        cfg = ModelConfig.from_kwargs(dataclasses.asdict(config) if config else {}, **options)
        if cfg.engine != "transformers":
            engine = ENGINES.get(cfg.engine)
            if engine is None:
                raise ConfigError(f"engine: {cfg.engine!r} is not registered (known: {sorted(ENGINES)})")
            return engine.from_pretrained(name_or_path, cfg)
        loaded = load(name_or_path, cfg)
        return cls(loaded.model, loaded.tokenizer, family=loaded.family, config=cfg, name=str(name_or_path))

    @property
    def device(self) -> torch.device:
        """Where input ids go (the embedding's device, also under device_map sharding)."""
        return self.model.get_input_embeddings().weight.device

    # -- the public verb -------------------------------------------------------------
    def score(
        self, samples: Sequence[SampleLike], *, progress: Callable[[int], None] | None = None
    ) -> list[float]:
        """One raw score per sample, in input order; all or nothing.

        Raises BatchScoringError if any sample could not be scored; its ``results`` still
        hold the scores of all the others. Use :meth:`score_detailed` to get per-sample
        errors instead.
        """
        results = self.score_detailed(samples, progress=progress)
        if any(r.error is not None for r in results):
            raise BatchScoringError(results)
        return [float(r.score) for r in results]  # type: ignore[arg-type]

    def score_detailed(
        self,
        samples: Sequence[SampleLike],
        *,
        progress: Callable[[int], None] | None = None,
        start_index: int = 0,
    ) -> list[ScoreResult]:
        """One :class:`ScoreResult` per sample, in input order; never raises for a bad sample.

        ``progress`` is called with the number of samples finished after each micro-batch.
        ``start_index`` is added to the sample numbers quoted in error messages (for callers
        that score a large input in chunks).
        """
        results = [ScoreResult() for _ in samples]
        parsed: list[tuple[int, Any]] = []
        for i, raw in enumerate(samples):
            try:
                sample = parse_sample(raw, start_index + i)
            except SampleError as exc:
                results[i].error = str(exc)
                continue
            parsed.append((i, without_reasoning(sample) if self.config.strip_think else sample))
        encoded = self.encoder.encode_batch([s for _, s in parsed], [start_index + i for i, _ in parsed])
        ready: list[tuple[int, Encoded]] = []
        for (i, _), enc in zip(parsed, encoded):
            if isinstance(enc, SampleError):
                results[i].error = str(enc)
            else:
                results[i].num_tokens = len(enc.input_ids)
                results[i].truncated = enc.truncated
                results[i].num_truncated_tokens = enc.num_truncated_tokens
                results[i].response_truncated = enc.response_truncated
                ready.append((i, enc))
        if progress is not None and len(ready) < len(samples):
            progress(len(samples) - len(ready))

        stats = BatchStats(num_samples=len(samples))
        self._score_encoded(ready, results, stats, progress, start_index)
        finite_or_error(results, start_index)  # an overflowed score is that sample's error
        stats.num_errors = sum(r.error is not None for r in results)
        stats.num_truncated = sum(r.truncated for r in results)
        self.last_stats = stats
        if stats.num_truncated:
            logger.info(
                "%d of %d samples were truncated to max_length=%d",
                stats.num_truncated,
                len(samples),
                self.max_length,
            )
        return results

    def close(self) -> None:
        """Release what the engine holds outside this object (nothing for transformers)."""

    def __enter__(self) -> RewardModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------
    def _score_encoded(
        self,
        ready: list[tuple[int, Encoded]],
        results: list[ScoreResult],
        stats: BatchStats,
        progress: Callable[[int], None] | None,
        start_index: int,
    ) -> None:
        """Fill ``results[i].score`` for every encoded sample (the engine's part)."""
        rest = ready
        if self._prefix_parts is not None and len(ready) > 1:
            plan = plan_shared_prefixes(
                [e.input_ids for _, e in ready], self.min_shared_prefix, self.min_shared_group
            )
            grouped = {j for _, members in plan for j in members}
            rest = [item for j, item in enumerate(ready) if j not in grouped]
            if plan:
                groups = [(shared, [ready[j] for j in members]) for shared, members in plan]
                rest += self._run_shared_groups(groups, results, stats, progress)
        lengths = [len(e.input_ids) for _, e in rest]
        for batch in plan_batches(
            lengths, self.max_batch_tokens, self.max_batch_size, self.max_padding_fraction
        ):
            self._run_batch([rest[j] for j in batch], results, stats, start_index)
            if progress is not None:
                progress(len(batch))

    def _run_shared_groups(
        self,
        groups: list[tuple[int, list[tuple[int, Encoded]]]],
        results: list[ScoreResult],
        stats: BatchStats,
        progress: Callable[[int], None] | None,
    ) -> list[tuple[int, Encoded]]:
        """Score groups of samples that share their first token ids: each wave of prefixes runs
        once as one right-padded batch, then the suffixes of all its groups run in micro-batches
        that read their own prefix from the KV cache. Returns the samples of waves that ran out
        of device memory (nothing recorded for them): the caller scores those unshared."""
        assert self._prefix_parts is not None
        backbone, head = self._prefix_parts
        fallback: list[tuple[int, Encoded]] = []
        prefix_lengths = [shared for shared, _ in groups]
        for wave in plan_batches(prefix_lengths, self.max_batch_tokens, None, self.max_padding_fraction):
            done = self._run_wave([groups[k] for k in wave], backbone, head, results, stats, progress)
            if not done:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                members = [item for k in wave for item in groups[k][1]]
                logger.warning(
                    "out of memory on %d shared-prefix samples; scoring them unshared", len(members)
                )
                fallback.extend(members)
        return fallback

    def _run_wave(
        self,
        groups: list[tuple[int, list[tuple[int, Encoded]]]],
        backbone: Any,
        head: Any,
        results: list[ScoreResult],
        stats: BatchStats,
        progress: Callable[[int], None] | None,
    ) -> bool:
        rows = [g for g, (_, members) in enumerate(groups) for _ in members]
        items = [item for _, members in groups for item in members]
        suffixes = [enc.input_ids[groups[g][0] :] for g, (_, enc) in zip(rows, items)]
        longest_prefix = max(shared for shared, _ in groups)
        max_rows = max(1, self.max_batch_tokens // (longest_prefix + max(map(len, suffixes))))
        plan = plan_batches(
            [len(x) for x in suffixes],
            self.max_batch_tokens,
            min(self.max_batch_size, max_rows),
            self.max_padding_fraction,
        )
        scores: dict[int, float] = {}
        computed = len(groups) * longest_prefix
        with contextlib.suppress(torch.OutOfMemoryError), torch.inference_mode():
            device = self.device
            prefix_ids, prefix_mask = self._padded(
                [items[rows.index(g)][1].input_ids[:shared] for g, (shared, _) in enumerate(groups)]
            )
            prefix_ids, prefix_mask = prefix_ids.to(device), prefix_mask.to(device)
            cache = encode_prefixes(backbone, prefix_ids, prefix_mask)
            for batch in plan:
                ids, mask = self._padded([suffixes[j] for j in batch])
                which = torch.as_tensor([rows[j] for j in batch], device=device)
                out = score_after_prefixes(
                    backbone, head, cache, prefix_mask, which, ids.to(device), mask.to(device)
                )
                scores.update(zip(batch, out.float().cpu().tolist()))
                computed += len(batch) * ids.shape[1]
            del cache
        if len(scores) != len(items):
            return False
        for j, (i, _) in enumerate(items):
            results[i].score = scores[j]
        stats.num_batches += len(plan) + 1
        stats.shared_groups += len(groups)
        stats.shared_prefix_tokens += sum(shared * (len(members) - 1) for shared, members in groups)
        stats.real_tokens += sum(shared for shared, _ in groups) + sum(map(len, suffixes))
        stats.padded_tokens += computed
        if progress is not None:
            progress(len(items))
        return True

    def _run_batch(
        self,
        batch: list[tuple[int, Encoded]],
        results: list[ScoreResult],
        stats: BatchStats,
        start_index: int,
    ) -> None:
        scores: list[float] | None = None
        # An OOM is retried below, OUTSIDE the handler: while it is being handled the exception's
        # traceback pins the failed attempt's activations (the PyTorch FAQ pitfall).
        with contextlib.suppress(torch.OutOfMemoryError):
            scores = self.forward_ids([e.input_ids for _, e in batch])
        if scores is None:
            if len(batch) == 1:
                i, enc = batch[0]
                results[i].error = (
                    f"sample {start_index + i}: out of device memory at {len(enc.input_ids)} tokens; "
                    "lower max_length"
                )
                return
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(batch) // 2
            logger.warning("out of memory on a batch of %d; retrying in halves", len(batch))
            self._run_batch(batch[:half], results, stats, start_index)
            self._run_batch(batch[half:], results, stats, start_index)
            return
        stats.num_batches += 1
        stats.real_tokens += sum(len(e.input_ids) for _, e in batch)
        stats.padded_tokens += len(batch) * max(len(e.input_ids) for _, e in batch)
        for (i, _), s in zip(batch, scores):
            results[i].score = s

    def _padded(self, batch_ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (B, T) ids and attention mask (1 = real token)."""
        longest = max(len(ids) for ids in batch_ids)
        input_ids = torch.full((len(batch_ids), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch_ids), longest), dtype=torch.long)
        for row, ids in enumerate(batch_ids):
            input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = 1
        return input_ids, mask

    @torch.inference_mode()
    def forward_ids(self, batch_ids: Sequence[Sequence[int]]) -> list[float]:
        """Raw scores of already-encoded sequences (each read at its own last token).

        The sequences are right-padded into one tensor; pass similar lengths for speed.
        """
        input_ids, mask = self._padded(batch_ids)
        device = self.device
        scores = self._forward(input_ids.to(device), mask.to(device))
        return scores.float().cpu().tolist()
