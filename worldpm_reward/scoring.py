"""The public scoring verb: a batch of conversations in, one raw reward per conversation out.

:class:`RewardModel` is the engine-neutral front. It validates every sample (a bad sample
becomes an error result, the others are still scored), strips reasoning where configured,
encodes with the family's encoder (format, truncation and its flags), hands the encoded ids
of the valid samples to its engine (``rm.engine``, :mod:`worldpm_reward.engines`: the
transformers model in this process by default, or vLLM, or one model sharded over
torch.distributed ranks), makes any non-finite score that sample's error and keeps the
counters of the call. Results come back in input order, and a sample scores the same alone
as in any batch (within float rounding).

The engine is picked by name (``ModelConfig.engine``) from the lazy registry
:data:`worldpm_reward.engines.ENGINES`, and imported only when a model is loaded.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from worldpm_reward.config import ModelConfig
from worldpm_reward.encoder import Encoded, Encoder
from worldpm_reward.engines import ENGINES, BatchStats, Engine, LoadedEngine, engine_class
from worldpm_reward.errors import BatchScoringError, SampleError
from worldpm_reward.families import RewardFamily, get_family
from worldpm_reward.policy_text import without_reasoning
from worldpm_reward.samples import SampleLike, Scorer, ScoreResult, finite_or_error, parse_sample

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["ENGINES", "BatchStats", "RewardModel", "Scorer", "engine_class"]


class RewardModel:
    """A loaded reward model that scores conversations; the engine-neutral front.

    Build it with :meth:`from_pretrained` (or :meth:`from_model` around a transformers model
    already in memory). Scores are the model's RAW outputs: for WorldPM an unbounded
    Bradley-Terry logit where higher means more preferred and a difference of d between two
    replies means P(first preferred) = sigmoid(d).

    ``engine`` runs the forward pass (:class:`~worldpm_reward.engines.base.Engine`); its
    batching knobs (``max_batch_tokens``, ``row_tokens``, ``share_prefixes`` of the
    transformers engine) and its own operations (the sharded engine's ``memory()``,
    ``offload()``, ``onload()``) are reached there: ``rm.engine.offload()``.
    """

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        encoder: Encoder,
        *,
        family: RewardFamily,
        config: ModelConfig,
        name: str = "",
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.family_spec = family
        self.family = family.name
        self.config = config
        self.name = name
        self.max_length = encoder.max_length
        self.last_stats = BatchStats()

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
        ``token``; ``engine`` picks what runs the forward pass (:mod:`worldpm_reward.engines`):
        "transformers" (default), "vllm" (with ``vllm_url`` / ``vllm_python`` / ``vllm_args``)
        or "fsdp" (under torch.distributed). An unknown option is a TypeError naming the known
        ones.
        """
        cfg = ModelConfig.from_kwargs(dataclasses.asdict(config) if config else {}, **options)
        return cls._of(engine_class(cfg.engine).load(name_or_path, cfg), cfg, str(name_or_path))

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        tokenizer: Any,
        *,
        family: str | RewardFamily,
        config: ModelConfig | None = None,
        name: str = "",
        **options: Any,
    ) -> RewardModel:
        """A reward model around a transformers model already in memory (tests, benchmarks,
        a model just trained), run by the transformers engine; ``options`` as for
        :meth:`from_pretrained`. The model is not changed: it keeps its own attention, so on
        CPU it runs packed rows under a block mask, not the faster per-segment attention and
        fused forward that :meth:`from_pretrained` gives a model it loads itself (about 1.35x
        the throughput on GRPO groups, benchmarks/README.md)."""
        from worldpm_reward.engines.transformers import TransformersEngine

        spec = family if isinstance(family, RewardFamily) else get_family(family)
        cfg = (config or ModelConfig()).replace(**options)
        return cls._of(TransformersEngine.wrap(model, tokenizer, spec, cfg), cfg, name)

    @classmethod
    def _of(cls, loaded: LoadedEngine, config: ModelConfig, name: str) -> RewardModel:
        return cls(
            loaded.engine, loaded.tokenizer, loaded.encoder, family=loaded.family, config=config, name=name
        )

    @property
    def model(self) -> Any:
        """The engine's torch module (``rm.engine.model``); None where vLLM holds the weights."""
        return self.engine.model

    @property
    def device(self) -> torch.device:
        """Where input ids go (the embedding's device, also under device_map sharding)."""
        return self.engine.device  # type: ignore[no-any-return]

    @property
    def alive(self) -> bool:
        """False once the engine can no longer score (a launched vLLM exited; the reward server
        then restarts its scorer)."""
        return self.engine.alive

    def forward_ids(self, batch_ids: Sequence[Sequence[int]]) -> list[float]:
        """Raw scores of already-encoded sequences (each read at its own last token), in one
        engine call (see the engine's ``forward_ids``)."""
        return self.engine.forward_ids(batch_ids)

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
        self.engine.score_encoded(ready, results, stats, progress, start_index)
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
        self.engine.end_call(stats)
        return results

    def close(self) -> None:
        """Release what the engine holds outside this process (a launched vLLM server)."""
        self.engine.close()

    def __enter__(self) -> RewardModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
