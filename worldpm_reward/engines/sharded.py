"""engine="fsdp": ONE reward model sharded across the ranks of a torch.distributed job.

Colocating the reward model with the policy used to mean a full copy in every training
process, so WorldPM-72B (~145 GB in bf16) could only be served remotely. Here the ranks of
the training job (``accelerate launch`` / ``torchrun``; TRL's processes) hold one copy
between them, as OpenRLHF's ``--colocate_all_models`` (ZeRO-3) and veRL's FSDP reward model
do: over 8 ranks, WorldPM-72B is ~18 GB per GPU.

    reward = WorldPMReward("Qwen/WorldPM-72B", model_kwargs={"engine": "fsdp"})  # every rank

**Loading.** Every rank builds the model on the meta device (no memory), applies FSDP2's
``fully_shard`` to each decoder layer and to the root (final norm and head), splits the
embedding table by vocabulary rows (:class:`VocabShardedEmbedding`: looked up without ever
gathering the table), allocates only its own shard and reads only its own rows of every
tensor from the safetensors files (memory-mapped slices,
:class:`~worldpm_reward.checkpoints.TensorRows`). No rank ever holds the whole model. The checkpoint passes the family's strict weight check
first (names and shapes from the safetensors headers), so a stock single-Linear head is
refused with the same message as the other engines. Families whose loading converts
weights (POLAR's fused ``wqkv``) are not served by this engine.

**Scoring is collective.** A forward pass all-gathers each layer's parameters from every
rank, so every rank must make the same forward calls in the same order, whatever its own
samples. Each rank encodes its own samples (bad ones get their own error, as always) and
plans its own length-sorted micro-batches; before each forward call the ranks agree (one
all-reduce of a number) whether any rank still has work, and a rank with nothing left (no
samples, only invalid ones, or fewer batches) runs a one-token dummy call. Inputs may differ
in shape between ranks: only parameters travel. Scores equal the unsharded model's (the same
parameters, gathered).

**A failing batch never deadlocks the others.** If a rank's forward fails (out of memory,
anything raised), that rank completes the collective schedule the others are waiting for
(it all-gathers the layers it did not reach, computing nothing) and then retries the batch
in halves, down to single samples that carry the error. The only unbounded wait left is a
rank that never calls the scorer at all (it crashed): that is bounded by the process
group's timeout (``init_process_group(timeout=...)``, 30 min by default).

**RoPE that scales with length** (dynamic NTK, LongRoPE) where the longest encoding
(``encoder.max_tokens``) passes the trained context: transformers scales a forward call by its longest position, so each rank
runs its samples one per call (its rotary frequencies reset before each), as the
transformers engine does; a score then depends neither on its batch nor on earlier calls.

**Offload** (``fsdp_offload=True``, GPU only): between reward calls this rank's shard lives
in CPU memory, moved to the GPU for each call (``offload_seconds`` / ``onload_seconds``
accumulate what the moves cost).

Not here: shared-prefix scoring (every rank would have to agree on the cache calls), the
CLI and server (one process; serve WorldPM-72B with ``device_map="auto"`` or vLLM there).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from worldpm_reward.batching import plan_batches
from worldpm_reward.checkpoints import (
    TensorRows,
    local_checkpoint_dir,
    read_config_dict,
    resolve_dtype,
    tensor_shapes,
)
from worldpm_reward.config import ModelConfig
from worldpm_reward.encoder import Encoded
from worldpm_reward.engines.base import BatchStats, Engine, EngineClass, LoadedEngine, Progress
from worldpm_reward.engines.transformers import default_pad_id, length_scaled_rope, reset_rope, right_padded
from worldpm_reward.errors import CheckpointError, ConfigError, EngineError
from worldpm_reward.families import RewardFamily, detect_family, get_family
from worldpm_reward.samples import ScoreResult

logger = logging.getLogger(__name__)

__all__ = ["ShardMemory", "ShardedEngine", "shard_rows"]


def shard_rows(rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of a tensor's dim 0 that FSDP2 gives ``rank``: torch.chunk's
    pieces, ``ceil(rows / world_size)`` rows each, the last ones shorter or empty."""
    size = -(-rows // world_size)
    return min(rank * size, rows), min((rank + 1) * size, rows)


@dataclass(frozen=True)
class ShardMemory:
    """What one rank holds of the reward model between calls, in parameter elements (bytes
    = elements x ``bytes_per_element``), measured from its tensors.

    Attributes:
        resident: parameter elements this rank holds (its shards, plus unsharded buffers).
        total: parameter elements of the whole model.
        largest_unit: elements of the largest unit gathered whole during a forward (a decoder
            layer, or the root's final norm and head): the transient extra.
        world_size: ranks the model is sharded over.
        bytes_per_element: 4 for fp32, 2 for bf16.
    """

    resident: int
    total: int
    largest_unit: int
    world_size: int
    bytes_per_element: int

    @property
    def resident_bytes(self) -> int:
        return self.resident * self.bytes_per_element

    @property
    def full_copy_bytes(self) -> int:
        return self.total * self.bytes_per_element


def _distributed() -> Any:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(
            "engine: 'fsdp' shards the reward model across the ranks of a torch.distributed job, "
            "and this process is in none: launch with `accelerate launch` / `torchrun` (TRL's "
            "multi-process runs do), or call torch.distributed.init_process_group() before loading; "
            "in a single process use engine='transformers' (device_map='auto' spreads a large model "
            "over this process's GPUs)"
        )
    return dist


def _default_device(config: ModelConfig) -> torch.device:
    if config.device is not None:
        return torch.device(config.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device("cpu")


def _rebuild_rotary(model: nn.Module, device: torch.device) -> set[str]:
    """Rotary embeddings hold computed, non-persistent buffers (``inv_freq``) that
    ``to_empty`` left uninitialised: build those modules again. Returns their buffer names."""
    rebuilt: set[str] = set()
    for name, module in list(model.named_modules()):
        if hasattr(module, "inv_freq") and hasattr(module, "config"):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            with torch.device(device):
                setattr(parent, child, type(module)(config=module.config))
            rebuilt |= {f"{name}.{b}" for b, _ in module.named_buffers()}
    return rebuilt


def _end_forward(unit: nn.Module) -> None:
    """Leave an FSDP unit as its post-forward hook would have, after a forward that raised
    inside it: idle and resharded. FSDP2 only reshards an idle unit (and never the root after
    a forward), and takes a unit stuck "in forward" as already gathered, which would skip its
    all-gather in the next call and put this rank out of step with the others. (FSDP2
    internals, torch 2.13; the failure test in tests/engines/test_sharded.py catches a change.)"""
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    state = unit._get_fsdp_state()  # type: ignore[operator]
    state._training_state = TrainingState.IDLE
    for group in state._fsdp_param_groups:
        group._training_state = TrainingState.IDLE
        group.reshard()
    state._state_ctx.iter_forward_root = None
    state._comm_ctx.all_gather_state = None


class VocabShardedEmbedding(nn.Module):
    """An embedding table split by rows (vocabulary ids) over the ranks, looked up without
    ever gathering the table: the ranks pool the distinct ids of their inputs, each fills the
    rows it owns, and a sum over the ranks gives every rank those rows (a few thousand rows,
    instead of the whole table: 152k rows of WorldPM-72B, 2.5 GB in bf16, per call).

    Collective: every rank calls it once per forward (``participate()`` with no ids of its
    own). Exact: each row is one rank's value plus zeros.
    """

    def __init__(self, num_embeddings: int, dim: int, start: int, stop: int, group: Any = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, dim
        self.start, self.stop = start, stop
        self.weight = nn.Parameter(torch.empty(stop - start, dim), requires_grad=False)
        self.group = group
        self.completed = False

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        dist = _distributed()
        weight = self.weight
        mine = torch.unique(input_ids.reshape(-1)).to(weight.device)
        world = dist.get_world_size(self.group)
        counts = [torch.zeros(1, dtype=torch.long, device=weight.device) for _ in range(world)]
        dist.all_gather(counts, torch.tensor([mine.numel()], device=weight.device), group=self.group)
        longest = max(int(c.item()) for c in counts)
        padded = torch.full((longest,), -1, dtype=torch.long, device=weight.device)
        padded[: mine.numel()] = mine
        everyone = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(everyone, padded, group=self.group)
        ids = torch.unique(torch.cat(everyone))
        ids = ids[ids >= 0]  # sorted: the same list on every rank
        rows = torch.zeros(ids.numel(), self.embedding_dim, dtype=weight.dtype, device=weight.device)
        own = (ids >= self.start) & (ids < self.stop)
        rows[own] = weight[ids[own] - self.start]
        dist.all_reduce(rows, group=self.group)
        self.completed = True  # this forward's collectives are done
        return rows[torch.searchsorted(ids, input_ids.to(weight.device))]

    def participate(self) -> None:
        """Take part in a forward's lookup with no ids of this rank's own."""
        self(torch.empty(0, dtype=torch.long, device=self.weight.device))


def load_sharded(
    name_or_path: str | os.PathLike[str], config: ModelConfig, device: torch.device
) -> tuple[nn.Module, list[nn.Module], RewardFamily, Any, int]:
    """Build the sharded model: (model, its FSDP units in forward order, family, tokenizer,
    checkpoint elements this rank read). Collective: every rank calls it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from transformers import AutoTokenizer

    dist = _distributed()
    hub = config.hub_kwargs
    where = f"checkpoint {str(name_or_path)!r}"
    config_dict = read_config_dict(name_or_path, **hub)
    family = get_family(detect_family(config_dict) if config.family == "auto" else config.family)
    with torch.device("meta"):
        model = family.skeleton(config_dict)
    if model is None:
        raise ConfigError(
            f"engine: 'fsdp' loads checkpoints whose tensor names are the module's (family 'worldpm'); "
            f"{where} is family {family.name!r}: use engine='transformers' or 'vllm'"
        )
    path = local_checkpoint_dir(name_or_path, **hub)
    family.check_weights(tensor_shapes(path), config_dict, where)  # before any weight is read
    reader = TensorRows(path)
    if config.attn_implementation is not None:
        model.config._attn_implementation = config.attn_implementation  # type: ignore[union-attr]
    model.to(resolve_dtype(config.dtype, device))
    model.eval()
    model.requires_grad_(False)
    parts = family.parts(model)
    if parts is None:
        raise ConfigError(f"engine: 'fsdp' needs a decoder reward model; {where} is not one")
    backbone: Any = parts[0]
    params = {n for n, _ in model.named_parameters()}
    persistent = set(model.state_dict()) - params
    layers: Any = backbone.layers

    world, rank = dist.get_world_size(), dist.get_rank()
    table = backbone.get_input_embeddings()
    vocab, dim = table.weight.shape
    with torch.device("meta"):
        embedding = VocabShardedEmbedding(int(vocab), int(dim), *shard_rows(int(vocab), world, rank))
    embedding.to(table.weight.dtype)
    backbone.set_input_embeddings(embedding)
    mesh = init_device_mesh(device.type, (world,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params={embedding.weight})  # the rest: final norm and head
    model.to_empty(device=device)
    embedding_name = next(n for n, m in model.named_modules() if m is embedding) + ".weight"
    with torch.no_grad():
        for name, param in model.named_parameters():
            local = param.to_local() if isinstance(param, DTensor) else param
            if name == embedding_name:
                start, stop = embedding.start, embedding.stop
            else:
                start, stop = shard_rows(param.shape[0], world, rank) if param.dim() else (0, 1)
            piece = reader.rows(name, start, stop)
            if tuple(local.shape) != tuple(piece.shape):
                raise CheckpointError(
                    f"{where}: rank {rank} of {world} expected rows {start}:{stop} of {name} as a "
                    f"{list(local.shape)} shard but read {list(piece.shape)}"
                )
            local.copy_(piece)
        rebuilt = _rebuild_rotary(model, device)
        for name, buf in model.named_buffers():
            if name in persistent:
                buf.copy_(reader.rows(name, 0, buf.shape[0] if buf.dim() else 1))
            elif name not in rebuilt:
                raise CheckpointError(f"{where}: buffer {name} would stay uninitialised in a sharded load")
    tokenizer = AutoTokenizer.from_pretrained(
        str(name_or_path), trust_remote_code=config.trust_remote_code, **hub
    )
    return model, [model, embedding, *layers], family, tokenizer, reader.elements_read


class ShardedEngine:
    """The reward model sharded over the torch.distributed ranks (see the module docstring).
    Build it on EVERY rank with ``RewardModel.from_pretrained(path, engine="fsdp")``; every
    rank then calls ``score_detailed`` (or ``score``) the same number of times, each with its
    own samples (any number, zero included). Its own operations are reached through the
    front: ``rm.engine.memory()``, ``rm.engine.offload()``, ``rm.engine.rank``.

    ``rm.last_stats`` are this rank's counters of the last call; ``global_stats`` here the
    same counters summed over all ranks.
    """

    def __init__(
        self,
        model: nn.Module,
        units: list[nn.Module],
        *,
        config: ModelConfig,
        device: torch.device,
        pad_token_id: int,
        max_length: int = 0,
        elements_read: int = 0,
    ) -> None:
        self.model: Any = model
        self.config = config
        self._device = device
        self._units = units  # [root, vocab-sharded embedding, *decoder layers]: forward order
        self.elements_read = elements_read  # checkpoint elements this rank read while loading
        on_gpu = device.type == "cuda"
        self.max_batch_tokens = int(config.max_batch_tokens or (32768 if on_gpu else 4096))
        self.max_batch_size = config.max_batch_size
        self.max_padding_fraction = float(
            config.max_padding_fraction
            if config.max_padding_fraction is not None
            else (0.3 if on_gpu else 0.05)
        )
        self.pad_token_id = pad_token_id
        # dynamic NTK / LongRoPE past the trained context: each sample in a call of its own, as
        # the transformers engine runs them (the rotary modules are each rank's own, unsharded)
        self.one_at_a_time, self._dynamic_rope = length_scaled_rope(model, max_length)
        if self.one_at_a_time is not None:
            self.max_batch_size = 1
        self.global_stats = BatchStats()
        self.dummy_calls = 0  # forward calls this rank made only to keep the others company
        self.offloaded = False
        self.offload_seconds = 0.0
        self.onload_seconds = 0.0
        self._gathered: list[nn.Module] = []
        for unit in units:  # after FSDP's own pre-forward hook (prepended): the unit is gathered
            if not isinstance(unit, VocabShardedEmbedding):
                unit.register_forward_pre_hook(lambda module, args: self._gathered.append(module))
        if config.fsdp_offload:
            self.offload()

    @classmethod
    def load(cls, name_or_path: str | os.PathLike[str], config: ModelConfig) -> LoadedEngine:
        """Load this rank's shard (collective: every rank calls it with the same arguments)."""
        cfg = config
        if cfg.device_map is not None:
            raise ConfigError("device_map: not used with engine='fsdp' (the ranks' devices hold the shards)")
        device = _default_device(cfg)
        if cfg.fsdp_offload and device.type != "cuda":
            logger.info("fsdp_offload: the shards already live in CPU memory on device %s", device)
        model, units, family, tokenizer, read = load_sharded(name_or_path, cfg, device)
        encoder = family.encoder(tokenizer, model.config, cfg)
        out = cls(
            model,
            units,
            config=cfg,
            device=device,
            pad_token_id=default_pad_id(tokenizer, encoder),
            max_length=encoder.max_tokens,
            elements_read=read,
        )
        mem = out.memory()
        logger.info(
            "rank %d holds %.1f%% of %s's parameters (%.2f GB of %.2f GB) over %d ranks",
            out.rank,
            100.0 * mem.resident / max(mem.total, 1),
            name_or_path,
            mem.resident_bytes / 1e9,
            mem.full_copy_bytes / 1e9,
            mem.world_size,
        )
        return LoadedEngine(out, tokenizer, family, encoder)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def rank(self) -> int:
        return int(_distributed().get_rank())

    @property
    def world_size(self) -> int:
        return int(_distributed().get_world_size())

    @property
    def alive(self) -> bool:
        return True

    def close(self) -> None:
        """Nothing to release: the shard is this process's."""

    # -- memory ---------------------------------------------------------------------
    def memory(self) -> ShardMemory:
        """This rank's share of the parameters, measured from the tensors it holds."""
        from torch.distributed.tensor import DTensor

        resident = total = 0
        for p in self.model.parameters():
            total += p.numel()
            resident += (p.to_local() if isinstance(p, DTensor) else p).numel()
        embedding = self.model.get_input_embeddings()
        total += embedding.num_embeddings * embedding.embedding_dim - embedding.weight.numel()
        resident += sum(b.numel() for b in self.model.buffers())
        layers = [sum(p.numel() for p in unit.parameters()) for unit in self._units[2:]]
        table = embedding.num_embeddings * embedding.embedding_dim
        largest = max([*layers, total - sum(layers) - table])  # the root unit: what the others do not hold
        elem = next(self.model.parameters()).element_size()
        return ShardMemory(resident, total, largest, self.world_size, elem)

    def offload(self) -> None:
        """Move this rank's shard to CPU memory (a no-op when the model runs on the CPU)."""
        if self.offloaded or self._device.type == "cpu":
            return
        start = time.perf_counter()
        self.model.to("cpu")
        torch.cuda.synchronize(self._device)
        self.offload_seconds += time.perf_counter() - start
        self.offloaded = True

    def onload(self) -> None:
        """Bring an offloaded shard back to this rank's device."""
        if not self.offloaded:
            return
        start = time.perf_counter()
        self.model.to(self._device)
        torch.cuda.synchronize(self._device)
        self.onload_seconds += time.perf_counter() - start
        self.offloaded = False

    # -- collective scoring ---------------------------------------------------------
    def end_call(self, stats: BatchStats) -> None:
        """Sum this call's counters over the ranks into ``global_stats`` (collective)."""
        self.global_stats = self._summed(stats)

    def forward_ids(self, batch_ids: Sequence[Sequence[int]]) -> list[float]:
        """Raw scores of already-encoded sequences, as one collective forward call (every rank
        calls it; an empty list takes part without scoring anything). Where each sequence must
        run alone (``one_at_a_time``) the ranks run their sequences one per forward call, in step.
        The shard is onloaded for the call where ``fsdp_offload`` is set, as for scoring."""
        self.onload()
        try:
            return self._forward_ids(batch_ids)
        finally:
            if self.config.fsdp_offload:
                self.offload()

    def _forward_ids(self, batch_ids: Sequence[Sequence[int]]) -> list[float]:
        if self.one_at_a_time is None:
            out = self._collective_forward(batch_ids or None)
            if isinstance(out, str):
                raise EngineError(f"the sharded forward failed on rank {self.rank}: {out}")
            return out[: len(batch_ids)]
        queue = collections.deque(batch_ids)
        scores: list[float] = []
        failure = ""
        while self._any_rank(len(queue)):  # no raising inside: the others wait for this rank's calls
            one = [queue.popleft()] if queue else None
            self.dummy_calls += one is None
            got = self._collective_forward(one)
            if one is not None:
                if isinstance(got, str):
                    failure = failure or got
                else:
                    scores.append(got[0])
        if failure:
            raise EngineError(f"the sharded forward failed on rank {self.rank}: {failure}")
        return scores

    def score_encoded(
        self,
        ready: list[tuple[int, Encoded]],
        results: list[ScoreResult],
        stats: BatchStats,
        progress: Progress | None,
        start_index: int,
    ) -> None:
        """Score this rank's samples in forward calls collective with the other ranks (the
        shard onloaded for the call where ``fsdp_offload`` is set)."""
        self.onload()
        try:
            self._score_collectively(ready, results, stats, progress, start_index)
        finally:
            if self.config.fsdp_offload:
                self.offload()

    def _score_collectively(
        self,
        ready: list[tuple[int, Encoded]],
        results: list[ScoreResult],
        stats: BatchStats,
        progress: Progress | None,
        start_index: int,
    ) -> None:
        lengths = [len(e.input_ids) for _, e in ready]
        plan = plan_batches(lengths, self.max_batch_tokens, self.max_batch_size, self.max_padding_fraction)
        queue = collections.deque([ready[j] for j in batch] for batch in plan)
        while self._any_rank(len(queue)):
            batch = queue.popleft() if queue else None
            if batch is None:
                self.dummy_calls += 1
                self._collective_forward(None)
                continue
            out = self._collective_forward([e.input_ids for _, e in batch])
            if isinstance(out, str):
                if len(batch) > 1:  # retry in halves: the others keep calling while this rank does
                    logger.warning(
                        "rank %d: a batch of %d failed (%s); retrying in halves", self.rank, len(batch), out
                    )
                    half = len(batch) // 2
                    queue.extendleft([batch[half:], batch[:half]])
                else:
                    i, enc = batch[0]
                    results[
                        i
                    ].error = f"sample {start_index + i}: not scored at {len(enc.input_ids)} tokens: {out}"
                    if progress is not None:
                        progress(1)
                continue
            stats.num_batches += 1
            stats.real_tokens += sum(len(e.input_ids) for _, e in batch)
            stats.padded_tokens += len(batch) * max(len(e.input_ids) for _, e in batch)
            for (i, _), score in zip(batch, out):
                results[i].score = score
            if progress is not None:
                progress(len(batch))

    def _collective_forward(self, batch_ids: Sequence[Sequence[int]] | None) -> list[float] | str:
        """One forward call in step with the other ranks: the scores, or what went wrong here.

        ``None`` runs a one-token dummy. On a failure this rank still all-gathers every unit it
        did not reach, so the other ranks' forward calls complete."""
        ids, mask = right_padded(batch_ids or [[self.pad_token_id]], self.pad_token_id)
        self._gathered.clear()
        for unit in self._units:
            if isinstance(unit, VocabShardedEmbedding):
                unit.completed = False
        failure = ""
        try:
            if self._dynamic_rope:
                reset_rope(self._dynamic_rope, self._device)  # local: no collective
            with torch.no_grad():
                scores = self.model(input_ids=ids.to(self._device), attention_mask=mask.to(self._device))
            self.model.reshard()  # FSDP2 keeps the root's own parameters gathered after a forward
            return scores.float().cpu().tolist()  # type: ignore[no-any-return]
        except torch.OutOfMemoryError:
            failure = "out of device memory (lower max_batch_tokens or max_length)"
        except Exception as exc:  # any local failure: this rank must still finish the schedule
            failure = f"{type(exc).__name__}: {exc}"
        logger.warning("rank %d: a forward call failed: %s", self.rank, failure)
        # Outside the handler: the exception's traceback no longer pins the failed activations.
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
        gathered = {id(m) for m in self._gathered}
        for unit in self._units:
            if isinstance(unit, VocabShardedEmbedding):
                if not unit.completed:
                    unit.participate()  # the lookup the other ranks wait for
                continue
            if id(unit) not in gathered:
                unit.unshard()  # type: ignore[operator]  # the all-gather the other ranks wait for
            _end_forward(unit)
        return failure

    def _any_rank(self, pending: int) -> bool:
        """Whether any rank still has a batch to run (collective)."""
        flag = torch.tensor([pending], dtype=torch.long, device=self._comm_device())
        _distributed().all_reduce(flag, op=_distributed().ReduceOp.MAX)
        return bool(flag.item() > 0)

    def _summed(self, stats: BatchStats) -> BatchStats:
        names = [f.name for f in dataclasses.fields(BatchStats) if isinstance(getattr(stats, f.name), int)]
        values = torch.tensor(
            [getattr(stats, n) for n in names], dtype=torch.long, device=self._comm_device()
        )
        _distributed().all_reduce(values)
        return dataclasses.replace(stats, **dict(zip(names, (int(v) for v in values.tolist()))))

    def _comm_device(self) -> torch.device:
        """Where the default process group takes tensors (NCCL: this rank's GPU)."""
        backend = str(_distributed().get_backend()).lower()
        return self._device if "nccl" in backend else torch.device("cpu")


if TYPE_CHECKING:  # mypy checks the class against the seam
    _engine: type[Engine] = ShardedEngine
    _loads: EngineClass = ShardedEngine
