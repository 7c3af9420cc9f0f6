"""engine="transformers" (the default): the reward model in this process, run by torch.

The encoded samples are sorted by length into token-budgeted micro-batches and run under
``torch.inference_mode``; each score is read at the sequence's true last token (from
lengths, never from the pad id). Where the backbone allows it
(:func:`worldpm_reward.packing.packing_support`: Qwen2/Llama-style decoders with sdpa or
eager attention) micro-batches are packed rows, several sequences per row under a
block-diagonal causal mask and no padding between them; samples that start with the same
long run of token ids (a GRPO group's prompt) put that prefix once in a row with their
suffixes after it. Other models run right-padded micro-batches with little padding. A
micro-batch that runs out of device memory is retried in halves, down to one sample, which
then carries the error. A sample scores the same alone as in any batch (within float
rounding).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from worldpm_reward.batching import plan_batches, plan_packed, plan_shared_prefixes, split_group
from worldpm_reward.config import ModelConfig
from worldpm_reward.encoder import Encoded
from worldpm_reward.engines.base import BatchStats, Engine, EngineClass, LoadedEngine, Progress
from worldpm_reward.families import RewardFamily, load
from worldpm_reward.fused import FusedDecoder, fused_support
from worldpm_reward.packing import (
    Block,
    PackedBatch,
    pack,
    packing_support,
    register_segment_attention,
    score_packed,
)
from worldpm_reward.samples import ScoreResult

logger = logging.getLogger(__name__)

__all__ = [
    "TransformersEngine",
    "auto_cpu_batch_tokens",
    "auto_min_shared_prefix",
    "auto_row_tokens",
    "compile_backbone",
    "default_pad_id",
    "right_padded",
]


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


#: A CPU micro-batch keeps its widest activation (the MLP's intermediate one) about this size.
CPU_ACTIVATION_BYTES = 20 << 20
#: Under the fused forward the MLP's gate/up output (tokens x 2 x intermediate_size) lives in one
#: buffer reused across layers and calls; a micro-batch keeps that buffer within this size.
FUSED_BUFFER_BYTES = 512 << 20


def auto_cpu_batch_tokens(model: Any, reused_activation: bool = False) -> int:
    """The CPU token budget per micro-batch, a power of two from 256 to 4096.

    transformers' forward: the largest whose MLP intermediate activation (tokens x
    intermediate_size x dtype bytes) stays within ~20 MiB; 1024 at Qwen2-0.5B dimensions in
    fp32. Larger micro-batches are slower per token there: their activations leave the caches,
    and blocks over glibc's largest mmap threshold (32 MiB) are mapped and page-faulted afresh
    at every step. Measured at 0.5B dimensions: 1024 tokens 1.3x as fast as 4096
    (benchmarks/README.md).

    ``reused_activation``: the forward keeps that activation in one buffer across layers and
    calls (:class:`~worldpm_reward.fused.FusedDecoder`), so no page faults, and larger GEMMs
    run closer to the CPU's peak: the largest whose gate/up buffer stays within
    ``FUSED_BUFFER_BYTES`` (4096 at 0.5B fp32, 2048 at 7B). Measured at 0.5B fp32: 2048
    tokens 1.11x as fast as 1024, 4096 1.05x as fast as 2048."""
    hf = model.config
    hidden = int(getattr(hf, "hidden_size", 0) or 0)
    width = int(getattr(hf, "intermediate_size", 0) or 4 * hidden)
    itemsize = next((p.element_size() for p in model.parameters()), 4)
    if width <= 0:
        return 4096
    if reused_activation:
        tokens = FUSED_BUFFER_BYTES // (2 * width * itemsize)
    else:
        tokens = CPU_ACTIVATION_BYTES // (width * itemsize)
    return int(min(4096, max(256, 1 << max(0, tokens.bit_length() - 1))))


def auto_min_shared_prefix(model: Any, on_gpu: bool) -> int:
    """The shortest prefix worth sharing: 32 tokens, or as many as it takes for the skipped
    compute (2 FLOPs per non-embedding parameter per token) to pay for a forward call's worth
    of fixed cost (planning, longer rows' attention). Toy models (hidden 32) get a bound no
    prefix reaches: their tokens cost less than that bookkeeping."""
    params = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name)
    overhead = FORWARD_CALL_OVERHEAD_FLOPS["gpu" if on_gpu else "cpu"]
    return max(32, math.ceil(overhead / max(2 * params, 1)))


def compile_backbone(backbone: nn.Module, device: torch.device) -> Any:
    """``torch.compile`` of a packed backbone (inductor, dynamic shapes: rows x width change
    with every micro-batch, so one graph serves them all, plus one for single-row batches).
    On CPU inductor's weight freezing folds the weights into the graph as constants and
    prepacks the GEMM weights: faster, but the weights must not change after the first call.
    Lazy: compiling happens at the first call."""
    options: dict[str, str | int | bool | Callable[..., Any]] = {"freezing": device.type == "cpu"}
    return torch.compile(backbone, dynamic=True, options=options)


def right_padded(batch_ids: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids and attention mask (1 = real token)."""
    longest = max(len(ids) for ids in batch_ids)
    input_ids = torch.full((len(batch_ids), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(batch_ids), longest), dtype=torch.long)
    for row, ids in enumerate(batch_ids):
        input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = 1
    return input_ids, mask


def default_pad_id(tokenizer: Any, encoder: Any) -> int:
    """The id padding positions get: the tokenizer's pad token, else the scored final token."""
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else (encoder.final_token_id or 0))


def _rope_types(module: nn.Module) -> list[tuple[str | None, str]]:
    """(layer_type, rope_type) of a transformers rotary-embedding module; [] for anything else."""
    rope_type = getattr(module, "rope_type", None)
    if isinstance(rope_type, dict):
        return [(str(k), str(v)) for k, v in rope_type.items()]
    return [(None, rope_type)] if isinstance(rope_type, str) else []


def _rope_config(config: Any) -> dict[str, Any]:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return rope if isinstance(rope, dict) else {}


def length_scaled_rope(model: nn.Module, max_length: int) -> tuple[str | None, list[nn.Module]]:
    """Why ``model``'s sequences must each run alone, in a forward call of their own, to score
    what they score alone (None when they need not), and the rotary modules to reset before each.

    transformers scales two kinds of RoPE by the LONGEST position in a forward call, once a
    call passes the trained context: ``dynamic`` (NTK) rescales its frequencies and keeps them
    for later, shorter calls (``max_seq_len_cached``); ``longrope`` switches from its short to
    its long factors. A batch of several sequences then rotates the shorter ones as the longest
    needs, and a dynamic model's score depends on what it scored before. Samples of up to
    ``max_length`` tokens that cannot pass the trained context are unaffected."""
    config: Any = getattr(model, "config", None)
    trained = int(getattr(config, "max_position_embeddings", 0) or 0)
    rope = _rope_config(config)
    reasons: list[str] = []
    dynamic: list[nn.Module] = []
    rotary = [m for m in model.modules() if _rope_types(m)]
    for module in rotary:
        for _, rope_type in _rope_types(module):
            if "dynamic" in rope_type:
                limit = int(getattr(module, "original_max_seq_len", 0) or trained)
                if max_length > limit:
                    reasons.append(f"dynamic RoPE past its trained {limit} positions")
                    if module not in dynamic:
                        dynamic.append(module)
            elif rope_type == "longrope":
                limit = int(rope.get("original_max_position_embeddings") or trained)
                if max_length > limit:
                    reasons.append(f"LongRoPE past its trained {limit} positions")
    if not rotary:  # no transformers rotary module to ask: read the config
        kind = rope.get("rope_type", rope.get("type"))
        if kind in ("dynamic", "longrope") and max_length > trained:
            reasons.append(f"{kind} RoPE past its trained {trained} positions")
    return (reasons[0] if reasons else None), dynamic


def reset_rope(modules: Sequence[nn.Module], device: torch.device) -> None:
    """Return dynamic-RoPE modules to their trained frequencies, as a freshly loaded model has
    them: a call at position 0 is transformers' own reset (a call within the trained context)."""
    x = torch.zeros(1, device=device)
    position = torch.zeros(1, 1, dtype=torch.long, device=device)
    for module in modules:
        for layer_type, rope_type in _rope_types(module):
            if "dynamic" in rope_type:
                module(x, position, **({} if layer_type is None else {"layer_type": layer_type}))


class TransformersEngine:
    """A transformers ``PreTrainedModel`` in this process (see the module docstring). Built by
    :meth:`load` (``RewardModel.from_pretrained(path)``), or around a model already in memory
    by :meth:`wrap` (``RewardModel.from_model``). The batching fields are ``ModelConfig``'s,
    with their device-dependent defaults filled in."""

    def __init__(
        self,
        model: nn.Module,
        family: RewardFamily,
        config: ModelConfig,
        *,
        max_length: int,
        pad_token_id: int,
        owns_model: bool = False,
    ) -> None:
        self.model: Any = model  # a transformers PreTrainedModel
        self.family_spec = family
        self.config = config
        self.max_length = max_length
        on_gpu = self.device.type == "cuda"
        cfg = config
        self.max_batch_size = cfg.max_batch_size
        self.min_shared_group = int(cfg.min_shared_group or (8 if on_gpu else 2))
        self.min_shared_prefix = int(cfg.min_shared_prefix or auto_min_shared_prefix(model, on_gpu))
        self.max_padding_fraction = float(
            cfg.max_padding_fraction if cfg.max_padding_fraction is not None else (0.3 if on_gpu else 0.05)
        )
        self._forward = family.forward_fn(model)
        #: why each sequence runs in a forward call of its own (RoPE scaled by the longest
        #: position in a call), None when sequences may share one; and the dynamic-RoPE
        #: modules reset before each call
        self.one_at_a_time, self._dynamic_rope = length_scaled_rope(model, max_length)
        self._packed_parts = self._packable()
        self.row_tokens = auto_row_tokens(model)
        #: packed rows run packing.SEGMENT_ATTENTION (each segment's own attention blocks only):
        #: on CPU, eagerly, for an sdpa model this engine loaded itself (a model handed to
        #: RewardModel.from_model keeps its attention); a micro-batch is then one unpadded row
        backbone_config: Any = None if self._packed_parts is None else self._packed_parts[0].config
        self.segment_attention = (
            backbone_config is not None
            and owns_model
            and not on_gpu
            and not cfg.compile
            and backbone_config._attn_implementation == "sdpa"
        )
        #: the fused forward (worldpm_reward.fused) that runs packed rows instead of the
        #: backbone's own, where segment attention applies and the backbone is a float32
        #: Llama-style decoder; None: transformers' forward. fused_off says why it is not used.
        self.fused: FusedDecoder | None = None
        self.fused_off: str | None = "segment attention is not in effect"
        if self.segment_attention and self._packed_parts is not None:
            self.fused_off = fused_support(self._packed_parts[0])
            if self.fused_off is None:
                self.fused = FusedDecoder(self._packed_parts[0])
        self.max_batch_tokens = int(
            cfg.max_batch_tokens
            or (32768 if on_gpu else auto_cpu_batch_tokens(model, reused_activation=self.fused is not None))
        )
        #: the most positions a shared-prefix group's row takes (its prefix once, then as many of
        #: its suffixes as fit), unless one suffix alone needs more
        self.group_row_tokens = min(self.max_batch_tokens, GROUP_ROW_FACTOR * self.row_tokens)
        if self.segment_attention:
            backbone_config._attn_implementation = register_segment_attention()
            self.row_tokens = self.max_batch_tokens
        self.share_prefixes = self._packed_parts is not None and bool(cfg.shared_prefix)
        self.pad_token_id = pad_token_id
        #: the backbone under torch.compile (config.compile), built lazily; None: eager
        self._compiled: Any = None
        #: why config.compile is not in effect (compiling failed, or padded micro-batches), else None
        self.compile_error: str | None = None
        if cfg.compile:
            if self._packed_parts is None:
                self.compile_error = "compile applies to packed backbones only; this model runs eagerly"
                logger.warning("compile: %s", self.compile_error)
            else:
                self._compiled = compile_backbone(self._packed_parts[0], self.device)

    @classmethod
    def load(cls, name_or_path: str | os.PathLike[str], config: ModelConfig) -> LoadedEngine:
        """Load the checkpoint with the family's strict weight checks, and its tokenizer."""
        loaded = load(name_or_path, config)
        return cls.wrap(loaded.model, loaded.tokenizer, loaded.family, config, owns_model=True)

    @classmethod
    def wrap(
        cls,
        model: nn.Module,
        tokenizer: Any,
        family: RewardFamily,
        config: ModelConfig,
        *,
        owns_model: bool = False,
    ) -> LoadedEngine:
        """The engine around a reward model already in memory, with the family's encoder.
        ``owns_model``: the engine loaded it, and may set its attention implementation."""
        encoder = family.encoder(tokenizer, model.config, config)
        engine = cls(
            model,
            family,
            config,
            max_length=encoder.max_tokens,
            pad_token_id=default_pad_id(tokenizer, encoder),
            owns_model=owns_model,
        )
        return LoadedEngine(engine, tokenizer, family, encoder)

    @property
    def device(self) -> torch.device:
        """Where input ids go (the embedding's device, also under device_map sharding)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def alive(self) -> bool:
        return True

    def close(self) -> None:
        """Nothing to release: the model is this process's."""

    def end_call(self, stats: BatchStats) -> None:
        """Nothing to do at the end of a call."""

    def _packable(self) -> tuple[nn.Module, nn.Module] | None:
        """(backbone, head) when micro-batches can be packed rows (:mod:`worldpm_reward.packing`),
        which is also what shared-prefix scoring runs on; None for padded micro-batches."""
        parts = self.family_spec.parts(self.model)
        why = (
            "the family has no backbone/head seam"
            if parts is None
            else packing_support(parts[0], self.max_length)
        )
        if why is None and self.one_at_a_time is not None:
            why = f"{self.one_at_a_time}: each sample runs alone"
        if why is not None:
            logger.info("padded micro-batches, no shared-prefix scoring: %s", why)
            return None
        return parts

    # -- scoring ---------------------------------------------------------------------
    def score_encoded(
        self,
        ready: list[tuple[int, Encoded]],
        results: list[ScoreResult],
        stats: BatchStats,
        progress: Progress | None,
        start_index: int,
    ) -> None:
        """Fill ``results[i].score`` for every encoded sample (see :class:`~worldpm_reward.engines.base.Engine`)."""
        if self._packed_parts is None:
            lengths = [len(e.input_ids) for _, e in ready]
            most = 1 if self.one_at_a_time is not None else self.max_batch_size
            for batch in plan_batches(lengths, self.max_batch_tokens, most, self.max_padding_fraction):
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
            self.max_padding_fraction,
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
                capacity = max(longest, self.group_row_tokens)
                for chunk in split_group(
                    shared, [len(x) for _, x in suffixes], capacity, self.max_batch_size
                ):
                    blocks.append(Block(prefix, [suffixes[j] for j in chunk]))
                stats.shared_groups += 1
        blocks += [Block((), [(i, e.input_ids)]) for j, (i, e) in enumerate(ready) if j not in grouped]
        return blocks

    def _score_packed(self, batch: PackedBatch) -> torch.Tensor:
        """Scores of a packed micro-batch: through the fused forward when there is one, else
        score_packed through the compiled backbone when there is one. A failure to compile
        (no C++ compiler, an unsupported operation) is logged with its reason, and this and
        every later batch run eagerly; running out of memory is the caller's to handle."""
        assert self._packed_parts is not None
        if self.fused is not None:
            return self.fused.score(self._packed_parts[1], batch, self.device)
        if self._compiled is not None:
            started = time.perf_counter()
            try:
                scores = score_packed(*self._packed_parts, batch, self.device, forward=self._compiled)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # any compile failure falls back to eager
                reason = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())[:300]
                self.compile_error = f"torch.compile failed ({type(exc).__name__}: {reason})"
                logger.warning("compile: %s; running the backbone eagerly from now on", self.compile_error)
                self._compiled = None
            else:
                seconds = time.perf_counter() - started
                if seconds > 10.0:
                    logger.info("compiled forward call took %.1f s (compiling included)", seconds)
                return scores
        return score_packed(*self._packed_parts, batch, self.device)

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
            scores = self._score_packed(batch).float().cpu().tolist()
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
            packed = self._score_packed(batch).float().cpu().tolist()
            by_key = dict(zip(batch.keys, packed))
            return [by_key[k] for k in range(len(batch_ids))]
        if self.one_at_a_time is not None and len(batch_ids) > 1:
            return [score for ids in batch_ids for score in self.forward_ids([ids])]
        input_ids, mask = right_padded(batch_ids, self.pad_token_id)
        device = self.device
        if self._dynamic_rope:
            reset_rope(self._dynamic_rope, device)
        scores = self._forward(input_ids.to(device), mask.to(device))
        return scores.float().cpu().tolist()


if TYPE_CHECKING:  # mypy checks the class against the seam
    _engine: type[Engine] = TransformersEngine
    _loads: EngineClass = TransformersEngine
