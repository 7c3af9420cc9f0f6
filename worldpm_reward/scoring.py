"""The public scoring verb: a batch of conversations in, one raw reward per conversation out.

:class:`RewardModel` validates and encodes every sample (a bad sample becomes an error
result, the others are still scored), sorts the rest by length into token-budgeted
micro-batches, runs them under ``torch.inference_mode`` and reads each score at the
sequence's true last token (from lengths, never from the pad id). Where the backbone allows
it (:func:`worldpm_reward.packing.packing_support`: Qwen2/Llama-style decoders with sdpa or
eager attention) micro-batches are packed rows, several sequences per row under a
block-diagonal causal mask and no padding between them; samples that start with the same
long run of token ids (a GRPO group's prompt) put that prefix once in a row with their
suffixes after it. Other models run right-padded micro-batches with little padding. A
sample scores the same alone as in any batch (within float rounding), and results come back
in input order.
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

from worldpm_reward.batching import plan_batches, plan_packed, plan_shared_prefixes, split_group
from worldpm_reward.config import ModelConfig
from worldpm_reward.errors import BatchScoringError, ConfigError, SampleError
from worldpm_reward.families import RewardFamily, get_family, load
from worldpm_reward.formatting import Encoded, Encoder
from worldpm_reward.packing import Block, pack, packing_support, score_packed
from worldpm_reward.policy_text import without_reasoning
from worldpm_reward.samples import SampleLike, Scorer, ScoreResult, finite_or_error, parse_sample

logger = logging.getLogger(__name__)

__all__ = ["ENGINES", "BatchStats", "RewardModel", "Scorer", "engine_class"]


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
    num_rows: int = 0  # rows computed (a packed row holds several sequences)

    @property
    def padding_fraction(self) -> float:
        return 0.0 if self.padded_tokens == 0 else 1.0 - self.real_tokens / self.padded_tokens


#: What one extra forward call costs, in FLOPs of model compute it could have done instead
#: (a CPU call's fixed cost is ~1-4 ms of Python and dispatch, a GPU call's ~1 ms of launches).
FORWARD_CALL_OVERHEAD_FLOPS = {"cpu": 2e8, "gpu": 5e11}


#: A shared-prefix group's rows may be this many times ``row_tokens`` long: the prefix then runs
#: once for more of its suffixes, which saves more than the longer rows' attention costs.
GROUP_ROW_FACTOR = 4


def auto_row_tokens(model: Any) -> int:
    """The width packed rows are filled to: where attention over a whole row (4 x width x hidden
    FLOPs per token, masked blocks included) costs about 6% of the token's other work (2 FLOPs
    per non-embedding parameter per layer); 512 at Qwen2-0.5B dimensions, 2048 at 7B. At
    least 512, so that sequences of a few hundred tokens share rows."""
    hf = model.config
    layers = max(1, int(getattr(hf, "num_hidden_layers", 1) or 1))
    hidden = int(getattr(hf, "hidden_size", 0) or 0)
    params = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name)
    if hidden <= 0:
        return 512
    width = 0.06 * 2 * params / layers / (4 * hidden)
    return int(min(4096, max(512, 256 * round(width / 256))))


def auto_min_shared_prefix(model: Any, on_gpu: bool) -> int:
    """The shortest prefix worth sharing: 32 tokens, or as many as it takes for the skipped
    compute (2 FLOPs per non-embedding parameter per token) to pay for a forward call's worth
    of fixed cost (planning, longer rows' attention). Toy models (hidden 32) get a bound no
    prefix reaches: their tokens cost less than that bookkeeping."""
    params = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name)
    overhead = FORWARD_CALL_OVERHEAD_FLOPS["gpu" if on_gpu else "cpu"]
    return max(32, math.ceil(overhead / max(2 * params, 1)))


#: Engines other than transformers, by ``ModelConfig.engine`` name: "module:class" of a
#: RewardModel subclass whose ``from_pretrained(path, config)`` builds it. Imported on first
#: use, so neither this module nor ``worldpm-reward --help`` pays for an engine it does not run.
ENGINES: dict[str, str] = {
    "vllm": "worldpm_reward.engines.vllm_engine:VLLMRewardModel",
    "fsdp": "worldpm_reward.engines.sharded:ShardedRewardModel",
}


def engine_class(name: str) -> type[RewardModel]:
    """The RewardModel subclass of a registered engine (imports its module)."""
    import importlib

    target = ENGINES.get(name)
    if target is None:
        raise ConfigError(f"engine: {name!r} is not registered (known: {['transformers', *sorted(ENGINES)]})")
    module, _, attr = target.partition(":")
    cls: type[RewardModel] = getattr(importlib.import_module(module), attr)
    return cls


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
        self._packed_parts = self._packable()
        self.row_tokens = auto_row_tokens(model)
        self.share_prefixes = self._packed_parts is not None and bool(cfg.shared_prefix)
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

    def _packable(self) -> tuple[nn.Module, nn.Module] | None:
        """(backbone, head) when micro-batches can be packed rows (:mod:`worldpm_reward.packing`),
        which is also what shared-prefix scoring runs on; None for padded micro-batches."""
        parts = self.family_spec.parts(self.model)
        why = "the family has no backbone/head seam" if parts is None else packing_support(parts[0])
        hf = self.model.config
        rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
        limit = getattr(hf, "max_position_embeddings", None) or 0
        if why is None and rope.get("rope_type", rope.get("type")) == "dynamic" and self.max_length > limit:
            # dynamic RoPE rescales with the longest position in a forward call once it passes the
            # trained context: only a sequence alone computes exactly what it computes alone
            why = f"dynamic RoPE past max_position_embeddings={limit}"
        if why is not None:
            logger.info("padded micro-batches, no shared-prefix scoring: %s", why)
            return None
        return parts

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
            return engine_class(cfg.engine).from_pretrained(name_or_path, cfg)
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
        if self._packed_parts is None:
            lengths = [len(e.input_ids) for _, e in ready]
            for batch in plan_batches(
                lengths, self.max_batch_tokens, self.max_batch_size, self.max_padding_fraction
            ):
                self._run_batch([ready[j] for j in batch], results, stats, start_index)
                if progress is not None:
                    progress(len(batch))
            return
        blocks = self._blocks(ready, stats)
        plan = plan_packed(
            [b.length for b in blocks],
            self.max_batch_tokens,
            self.row_tokens,
            self.max_batch_size,
            [len(b.suffixes) for b in blocks],
        )
        for rows in plan:
            self._run_packed([[blocks[k] for k in row] for row in rows], results, stats, start_index)
            if progress is not None:
                progress(sum(len(blocks[k].suffixes) for row in rows for k in row))

    def _blocks(self, ready: list[tuple[int, Encoded]], stats: BatchStats) -> list[Block]:
        """What rows will hold: each shared-prefix group as blocks of one prefix and the suffixes
        that fit a row after it, every other sample as a block of its own."""
        grouped: set[int] = set()
        blocks: list[Block] = []
        if self.share_prefixes and len(ready) > 1:
            plan = plan_shared_prefixes(
                [e.input_ids for _, e in ready], self.min_shared_prefix, self.min_shared_group
            )
            for shared, members in plan:
                grouped.update(members)
                prefix = ready[members[0]][1].input_ids[:shared]
                suffixes = [(ready[j][0], ready[j][1].input_ids[shared:]) for j in members]
                longest = shared + max(len(x) for _, x in suffixes)
                capacity = max(longest, min(self.max_batch_tokens, GROUP_ROW_FACTOR * self.row_tokens))
                for chunk in split_group(
                    shared, [len(x) for _, x in suffixes], capacity, self.max_batch_size
                ):
                    blocks.append(Block(prefix, [suffixes[j] for j in chunk]))
                stats.shared_groups += 1
        blocks += [Block((), [(i, e.input_ids)]) for j, (i, e) in enumerate(ready) if j not in grouped]
        return blocks

    def _run_packed(
        self,
        rows: list[list[Block]],
        results: list[ScoreResult],
        stats: BatchStats,
        start_index: int,
    ) -> None:
        """One packed micro-batch. Out of device memory, it is retried in halves (its rows, a row's
        blocks, a block's suffixes), down to each sample alone and unshared."""
        assert self._packed_parts is not None
        batch = pack(rows, self.pad_token_id)
        scores: list[float] | None = None
        # An OOM is retried below, OUTSIDE the handler: while it is being handled the exception's
        # traceback pins the failed attempt's activations (the PyTorch FAQ pitfall).
        with contextlib.suppress(torch.OutOfMemoryError), torch.inference_mode():
            scores = score_packed(*self._packed_parts, batch, self.device).float().cpu().tolist()
        if scores is None:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(rows) > 1:
                parts = [rows[: len(rows) // 2], rows[len(rows) // 2 :]]
            elif len(rows[0]) > 1:
                parts = [[rows[0][: len(rows[0]) // 2]], [rows[0][len(rows[0]) // 2 :]]]
            elif len(rows[0][0].suffixes) > 1:
                block, half = rows[0][0], len(rows[0][0].suffixes) // 2
                parts = [
                    [[Block(block.prefix, block.suffixes[:half])]],
                    [[Block(block.prefix, block.suffixes[half:])]],
                ]
            elif rows[0][0].prefix:  # one suffix after its prefix: the sample alone, unshared
                block = rows[0][0]
                parts = [[[Block((), [(i, [*block.prefix, *ids])])]] for i, ids in block.suffixes]
            else:
                ((i, ids),) = rows[0][0].suffixes
                results[
                    i
                ].error = (
                    f"sample {start_index + i}: out of device memory at {len(ids)} tokens; lower max_length"
                )
                return
            logger.warning(
                "out of memory on a packed batch of %d tokens; retrying in parts", batch.computed_tokens
            )
            for part in parts:
                self._run_packed(part, results, stats, start_index)
            return
        stats.num_batches += 1
        stats.num_rows += len(rows)
        stats.real_tokens += batch.real_tokens
        stats.padded_tokens += batch.computed_tokens
        stats.shared_prefix_tokens += sum(
            len(b.prefix) * (len(b.suffixes) - 1) for row in rows for b in row if b.prefix
        )
        for i, s in zip(batch.keys, scores):
            results[i].score = s

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
        """Raw scores of already-encoded sequences (each read at its own last token), in one
        forward call: packed rows where the model allows it, else one right-padded tensor
        (then pass similar lengths for speed)."""
        if not batch_ids:
            return []
        if self._packed_parts is not None:
            blocks = [Block((), [(k, ids)]) for k, ids in enumerate(batch_ids)]
            (rows,) = plan_packed([len(ids) for ids in batch_ids], 1 << 62, self.row_tokens)
            batch = pack([[blocks[k] for k in row] for row in rows], self.pad_token_id)
            packed = score_packed(*self._packed_parts, batch, self.device).float().cpu().tolist()
            by_key = dict(zip(batch.keys, packed))
            return [by_key[k] for k in range(len(batch_ids))]
        input_ids, mask = self._padded(batch_ids)
        device = self.device
        scores = self._forward(input_ids.to(device), mask.to(device))
        return scores.float().cpu().tolist()
