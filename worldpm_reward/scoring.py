"""The public scoring verb: a batch of conversations in, one raw reward per conversation out.

:class:`RewardModel` validates and encodes every sample (a bad sample becomes an error
result, the others are still scored), sorts the rest by length into token-budgeted
micro-batches (little padding), runs them under ``torch.inference_mode`` and reads each
score at the sequence's true last token (from lengths, never from the pad id). A sample
scores the same alone as in any batch, and results come back in input order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from worldpm_reward.batching import plan_batches
from worldpm_reward.errors import BatchScoringError, SampleError
from worldpm_reward.formatting import WORLDPM_FINAL_TOKEN, ChatTemplateEncoder, Encoded, Encoder, Overflow
from worldpm_reward.loading import Family, load_checkpoint
from worldpm_reward.modeling import WorldPMForRewardModel, pool_last
from worldpm_reward.samples import SampleLike, ScoreResult, parse_sample

logger = logging.getLogger(__name__)


@runtime_checkable
class Scorer(Protocol):
    """Anything that turns a batch of samples into per-sample results, in input order.

    Implemented by :class:`RewardModel` (in process) and the HTTP client (remote); the
    framework adapters depend on this seam only.
    """

    def score_detailed(self, samples: Sequence[SampleLike]) -> list[ScoreResult]: ...


@dataclass
class BatchStats:
    """Counters of the last ``score_detailed`` call (for logging and benchmarks)."""

    num_samples: int = 0
    num_errors: int = 0
    num_truncated: int = 0
    num_batches: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0  # positions computed, padding included

    @property
    def padding_fraction(self) -> float:
        return 0.0 if self.padded_tokens == 0 else 1.0 - self.real_tokens / self.padded_tokens


def _forward_fn(model: nn.Module, family: Family) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(input_ids, attention_mask) -> raw scores (B,), pooled at the true last token."""
    from worldpm_reward.polar import PolarRewardModel

    if isinstance(model, (WorldPMForRewardModel, PolarRewardModel)):
        return model.forward
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = getattr(model, "score", None)
    if isinstance(head, nn.Linear) and head.out_features == 1 and backbone is not None:
        # Decoder reward models (LlamaForSequenceClassification, Qwen2ForSequenceClassification,
        # ...): run backbone + head ourselves so pooling uses lengths, not the pad id.
        def decoder_rm(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            pooled = pool_last(hidden, mask)
            return head(pooled.to(head.weight.device)).squeeze(-1)  # type: ignore[operator]

        return decoder_rm

    def own_pooling(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask).logits[:, 0]

    return own_pooling


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
        family: Family,
        max_length: int | None = None,
        overflow: Overflow = "truncate",
        max_batch_tokens: int | None = None,
        max_batch_size: int = 64,
        max_padding_fraction: float | None = None,
        chat_template: str | None = None,
        name: str = "",
    ) -> None:
        self.model: Any = model  # a transformers PreTrainedModel
        self.tokenizer = tokenizer
        self.family = family
        self.name = name
        config = model.config
        self.encoder: Encoder
        if family == "polar":
            from worldpm_reward.polar import PolarEncoder

            self.max_length = int(max_length or 16384)  # POLAR's reference client budget
            self.encoder = PolarEncoder(
                tokenizer,
                max_length=self.max_length,
                reward_token_id=getattr(config, "reward_token_id", None),
            )
        else:
            self.max_length = int(max_length or getattr(config, "max_position_embeddings", None) or 4096)
            self.encoder = ChatTemplateEncoder(
                tokenizer,
                max_length=self.max_length,
                ensure_system=(family == "worldpm"),
                final_token=WORLDPM_FINAL_TOKEN if family == "worldpm" else None,
                overflow=overflow,
                chat_template=chat_template,
            )
        on_gpu = self.device.type == "cuda"
        self.max_batch_tokens = int(max_batch_tokens or (32768 if on_gpu else 4096))
        self.max_batch_size = max_batch_size
        self.max_padding_fraction = float(
            max_padding_fraction if max_padding_fraction is not None else (0.3 if on_gpu else 0.05)
        )
        self._forward = _forward_fn(model, family)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else (self.encoder.final_token_id or 0))
        self.last_stats = BatchStats()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        family: str = "auto",
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        device_map: str | dict[str, Any] | None = None,
        attn_implementation: str | None = None,
        max_length: int | None = None,
        overflow: Overflow = "truncate",
        max_batch_tokens: int | None = None,
        max_batch_size: int = 64,
        max_padding_fraction: float | None = None,
        trust_remote_code: bool = False,
        chat_template: str | None = None,
        revision: str | None = None,
        token: str | None = None,
    ) -> RewardModel:
        """Load a reward model checkpoint (a hub id or a local directory).

        Args:
            family: "auto" (from config.json's architectures), "worldpm", "polar" or "generic".
            dtype: "auto" (bfloat16 on GPU, float32 on CPU), "bf16", "fp16", "fp32" or a torch dtype.
            device: "cuda", "cuda:1", "cpu", ... (default: cuda when available).
            device_map: e.g. "auto" to shard a large model (WorldPM-72B) over all visible GPUs.
            attn_implementation: "sdpa", "eager", "flash_attention_2", ...
            max_length: most tokens per sample (default: the model's max_position_embeddings);
                longer samples lose tokens from the start, and are flagged.
            overflow: "truncate" (default) or "error" to refuse over-long samples.
            trust_remote_code: run code shipped with the checkpoint (off by default; WorldPM
                never needs it).
            max_batch_tokens: padded-token budget per micro-batch (default 32768 on GPU, 4096 on CPU).
            max_batch_size: most sequences per micro-batch.
            max_padding_fraction: most padding share per micro-batch (default 0.3 on GPU,
                0.05 on CPU, where a padded position costs as much as a real one).
            chat_template: override the checkpoint's chat template (Jinja string).
        """
        loaded = load_checkpoint(
            name_or_path,
            family=family,
            dtype=dtype,
            device=device,
            device_map=device_map,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            revision=revision,
            token=token,
        )
        return cls(
            loaded.model,
            loaded.tokenizer,
            family=loaded.family,
            max_length=max_length,
            overflow=overflow,
            max_batch_tokens=max_batch_tokens,
            max_batch_size=max_batch_size,
            max_padding_fraction=max_padding_fraction,
            chat_template=chat_template,
            name=str(name_or_path),
        )

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
                parsed.append((i, parse_sample(raw, start_index + i)))
            except SampleError as exc:
                results[i].error = str(exc)
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
        lengths = [len(e.input_ids) for _, e in ready]
        for batch in plan_batches(
            lengths, self.max_batch_tokens, self.max_batch_size, self.max_padding_fraction
        ):
            self._run_batch([ready[j] for j in batch], results, stats, start_index)
            if progress is not None:
                progress(len(batch))
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

    # -- internals -------------------------------------------------------------------
    def _run_batch(
        self,
        batch: list[tuple[int, Encoded]],
        results: list[ScoreResult],
        stats: BatchStats,
        start_index: int,
    ) -> None:
        try:
            scores = self.forward_ids([e.input_ids for _, e in batch])
        except torch.OutOfMemoryError:
            if len(batch) == 1:
                i, enc = batch[0]
                results[
                    i
                ].error = f"sample {start_index + i}: out of device memory at {len(enc.input_ids)} tokens; lower max_length"
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

    @torch.inference_mode()
    def forward_ids(self, batch_ids: Sequence[Sequence[int]]) -> list[float]:
        """Raw scores of already-encoded sequences (each read at its own last token).

        The sequences are right-padded into one tensor; pass similar lengths for speed.
        """
        longest = max(len(ids) for ids in batch_ids)
        input_ids = torch.full((len(batch_ids), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch_ids), longest), dtype=torch.long)
        for row, ids in enumerate(batch_ids):
            input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = 1
        device = self.device
        scores = self._forward(input_ids.to(device), mask.to(device))
        return scores.float().cpu().tolist()
