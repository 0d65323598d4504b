"""The training loop: one class that reads top-down.

``Trainer(config).run()`` joins the process group, builds the model on the meta device,
parallelizes it (activation checkpointing, FSDP2), allocates each rank's shards and fills them
from the pretrained safetensors, then trains: gradient accumulation with reduce-scatter only on
the last micro-step, a chunked loss normalised by the global number of target tokens, grad-norm
clipping, warmup + decay, a periodic eval loss, and one ``metrics.jsonl`` row per step.
"""

from __future__ import annotations

import base64
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusiontrain.parallel import distributed
from fusiontrain.checkpoint.fingerprint import fingerprint
from fusiontrain.checkpoint.manager import CheckpointManager
from fusiontrain.checkpoint.optimizer_state import OptimizerState
from fusiontrain.checkpoint.parts import load_part
from fusiontrain.config import TrainConfig, config_to_dict, data_sources, save_config, source_name
from fusiontrain.data import Batch, collate_padded
from fusiontrain.data.batch import Sample, with_placeholder_image, with_placeholder_items
from fusiontrain.data.errors import BadSample
from fusiontrain.data.loader import SKIP_REASONS
from fusiontrain.data.packing import collate_padding_free
from fusiontrain.train.data import (
    Dataset,
    build_dataset,
    build_eval_sets,
    build_streaming_train_loader,
    build_train_loader,
)
from fusiontrain.train.model_inputs import model_inputs
from fusiontrain.flops.peak import device_peak_flops, mfu
from fusiontrain.train.loss import count_targets
from fusiontrain.train.metrics import MetricsLogger, host_rss_bytes, peak_memory_bytes, reset_peak_memory
from fusiontrain.weights.hf_checkpoint import materialize
from fusiontrain.weights.lora import lora_settings_of
from fusiontrain.modules import get_fusion_params
from fusiontrain.modules.lora import is_lora_parameter
from fusiontrain.train.nonfinite import NonFiniteGuard, injection_from_env
from fusiontrain.parallel.fsdp import canonical_name, canonical_parameters, reshard
from fusiontrain.source.model_source import ModelSource
from fusiontrain.train.model import prepare_model
from fusiontrain.train.optim import build_lr_scheduler, build_optimizer
from fusiontrain.train.setup import build_batch_layout, build_parallel_model, step_settings
from fusiontrain.train.preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionWatcher, write_preemption_marker
from fusiontrain.train.step import TrainStep, loss_sum

_PLACEHOLDER = Sample(tokens=torch.zeros(1, dtype=torch.long), labels=torch.full((1,), -100), origin="placeholder")
logger = logging.getLogger("fusiontrain.train.trainer")


# -- the trainer ----------------------------------------------------------------------------------


class Trainer:
    """Trains a DeepFusionModel as ``config`` says. Call :meth:`run`."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        # SIGTERM / SIGUSR1 stop the run at a step boundary with a checkpoint; blocked until run()
        # starts (preemption.py). Dataloader workers start with the first loader (data/workers.py).
        self.preemption = PreemptionWatcher().install()
        self.context = distributed.init_distributed(timeout_s=config.distributed.timeout_s)
        self.device = self.context.device
        torch.manual_seed(config.seed)
        self.output_dir = Path(config.output_dir)
        if self.context.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.output_dir / "config.yaml")

        # Checked before anything is built: a global batch that does not split fails at once.
        self.layout = build_batch_layout(config.batch, config.parallel, self.context.world_size)
        self.mesh = distributed.build_mesh(self.context, config.parallel.dp_replicate, config.parallel.dp_shard)
        try:
            self.peak_flops: float | None = device_peak_flops(self.device)
        except ValueError as error:  # a GPU outside the peak table: no MFU rather than a wrong one
            logger.warning("MFU unavailable: %s", error)
            self.peak_flops = None
        self.source = ModelSource.from_config(config.model)
        self.model = self._build_model()
        reset_peak_memory(self.device)
        self.optimizer = build_optimizer(self.model, config.optim, self.device)
        self.scheduler = build_lr_scheduler(self.optimizer, config.optim, config.max_steps)
        # After model init every rank draws from its own stream (dropout, sampling), reproducibly.
        torch.manual_seed(config.seed + 1 + self.context.rank)

        self.image_format, inputs, self.collate_formats = model_inputs(config, self.source, self.model)
        streaming = config.data.streaming  # streamed train data has no table: the stream reads it (data/streaming.py)
        self.train_data = None if streaming else build_dataset(config, self.image_format, inputs, self.model, split="train")
        # (name, dataset) per eval set: one reports eval_loss, several eval_loss/<name> each too
        self.eval_sets = build_eval_sets(config, self.image_format, inputs, self.model)
        dp_rank, dp_size = self.context.rank, self.context.world_size
        self.grad_accum_steps = self.layout.grad_accum_steps
        if streaming:
            self.train_loader = build_streaming_train_loader(
                config, self.image_format, inputs, rank=dp_rank, world=dp_size, ignore_index=config.loss.ignore_index
            )
        else:
            self.train_loader = build_train_loader(
                config,
                self.train_data,
                self.image_format,
                inputs,
                rank=dp_rank,
                world=dp_size,
                combine=lambda table: distributed.all_reduce_sum(table.to(self.device), "sample size tables").cpu(),
                ignore_index=config.loss.ignore_index,
            )
        self.skipped_total = torch.zeros(len(SKIP_REASONS), dtype=torch.long, device=self.device)
        self.nonfinite = NonFiniteGuard(
            config.loss.nonfinite, config.loss.max_consecutive_nonfinite, injection=injection_from_env()
        )
        self.step = TrainStep(
            self.model,
            self.optimizer,
            self.scheduler,
            self.nonfinite,
            step_settings(config, flex_attention=self.device.type == "cuda"),
            device=self.device,
            world_size=self.context.world_size,
            skip_reasons=SKIP_REASONS,
            rank=self.context.rank,
            preemption_signal=self.preemption.local_signal,
            source_names=[source_name(source) for source in data_sources(config.data, "train")],
            input_formats=self.collate_formats if isinstance(self.collate_formats, dict) else {"image": self.image_format},
        )
        self.preempted_by: str | None = None  # the last step's preemption verdict
        self.start_step = 0
        self.tokens_seen = 0
        self.checkpointer = CheckpointManager(
            self.output_dir,
            base=self.source.manifest_entry(),
            fingerprint=fingerprint(self.source.folders, self.output_dir / ".base_fingerprint_cache.json"),
            keep_last_n=config.checkpoint.keep_last_n,
            async_save=config.checkpoint.async_save,
            lora=lora_settings_of(self.model),
        )
        self.wandb_run_id: str | None = None  # the wandb run to continue, from a checkpoint
        resume_from = self.checkpointer.resolve(config.checkpoint.resume)
        if resume_from is not None:
            self._restore(resume_from)
        elif config.model.fusion_init is not None:
            load_part(Path(config.model.fusion_init), "fusion", self.model_parts()["fusion"])
        self._train_batches = iter(self.train_loader)
        self.metrics = MetricsLogger(
            self.output_dir,
            is_main=self.context.is_main,
            console_every=config.logging.every_n_steps,
            config=config_to_dict(config),
            wandb_mode=config.logging.wandb.mode,
            wandb_project=config.logging.wandb.project,
            run_id=self.wandb_run_id,
            max_steps=min(config.max_steps, config.stop_after_steps or config.max_steps),
            start_step=self.start_step,
            world_size=self.context.world_size,
            device=self.device,
        )

    def _build_model(self) -> nn.Module:
        """Meta build -> parallelize -> allocate shards -> fill from the pretrained files."""
        config = self.config
        pretrained = prepare_model(config.model, self.source, seed=config.seed)
        # CPU peaks are measured above the RSS before the model holds memory (the runtime, the
        # process group and the model's code, transformers' for HF towers, excluded), from after
        # loading: the numbers the planner predicts.
        self.host_baseline = host_rss_bytes() if self.device.type == "cpu" else 0
        model = build_parallel_model(config, pretrained.model, self.mesh, self.device)  # still on the meta device
        materialize(model, self.device)
        pretrained.load(canonical_parameters(model))
        model.set_skip_output_projection(True)  # the chunked loss applies the output projection
        return model.train()

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        """Train for ``max_steps``; returns the per-step metrics (on every rank)."""
        history = []
        every = self.config.checkpoint.every_n_steps
        self.preemption.start()  # take SIGTERM / SIGUSR1 from here on
        try:
            last = min(self.config.max_steps, self.config.stop_after_steps or self.config.max_steps)
            for step in range(self.start_step, last):
                metrics = self.train_step(step)
                self.tokens_seen += metrics["real_tokens"]
                if self.eval_sets and self._due(self.config.eval.every_n_steps, step):
                    metrics.update(self.evaluate_all())
                self.metrics.log(step, metrics)
                history.append(metrics)
                done = step + 1
                saved = bool(every and (done % every == 0 or done == last))
                if saved:
                    self.save_checkpoint(done)
                self._stop_if_preempted(done, last, saved)
            self.checkpointer.close()  # the last save finished, its writer thread ended
        except BaseException as error:
            # Preempted: checkpointed, a distinct exit code; anything else marks the wandb run failed.
            self.metrics.close(exit_code=PREEMPTED_EXIT_CODE if isinstance(error, Preempted) else 1)
            raise
        finally:
            # The dataloader workers end now: they block SIGTERM, so the exit hook's terminate()
            # would never end them (data/workers.py).
            self.train_loader.close()
            self.metrics.close()
            self.preemption.uninstall()
        return history

    def _stop_if_preempted(self, done: int, last: int, saved: bool) -> None:
        """After step ``done``: if any rank had got SIGTERM / SIGUSR1 by the step's update (the
        step's all-reduce carries every rank's flag: :attr:`preempted_by`; a signal that comes
        later, during an eval or a save, counts at the next step), every rank checkpoints this
        step (also with ``checkpoint.every_n_steps: 0``) and raises
        :class:`~fusiontrain.train.preemption.Preempted`. At the last step the run just ends, with
        its checkpoint, so that a requeued job finds it complete."""
        reason = self.preempted_by
        if reason is None:
            return
        if not saved:
            self.save_checkpoint(done)
        self.checkpointer.wait()
        logger.warning(
            "rank %d: preempted (%s) after step %d: checkpoint %s written%s",
            self.context.rank,
            reason,
            done,
            self.output_dir / "checkpoints" / f"step_{done}",
            f", exiting with code {PREEMPTED_EXIT_CODE}" if done < last else "; the run is complete",
        )
        if done < last:
            if self.context.is_main:
                write_preemption_marker(done, reason, self.output_dir / "checkpoints" / f"step_{done}")
            raise Preempted(done, reason)

    # -- checkpoints ------------------------------------------------------------------------------

    def model_parts(self) -> dict[str, dict[str, torch.Tensor]]:
        """What a checkpoint holds of the model: every fusion parameter, every LoRA parameter (part
        ``lora``), plus the encoder's and decoder's trainable parameters (all of them with
        ``checkpoint.save_frozen``)."""
        fusion = {canonical_name(name) for name in get_fusion_params(self.model)}
        parts: dict[str, dict[str, torch.Tensor]] = {"fusion": {}}
        for name, param in canonical_parameters(self.model).items():
            if name in fusion:
                parts["fusion"][name] = param.detach()
            elif is_lora_parameter(name):
                parts.setdefault("lora", {})[name] = param.detach()
            elif param.requires_grad or self.config.checkpoint.save_frozen:
                parts.setdefault(name.partition(".")[0], {})[name] = param.detach()
        return parts

    def save_checkpoint(self, step: int) -> None:
        """Checkpoint the state after ``step`` optimizer steps (all ranks call it). Refuses, with
        :class:`~fusiontrain.train.nonfinite.NonFiniteError` on every rank, to write non-finite
        trainable weights or optimizer state."""
        model_parts = self.model_parts()
        trainable = {name for name, param in canonical_parameters(self.model).items() if param.requires_grad}
        self.nonfinite.check_before_save(
            step,
            {name: t for part in model_parts.values() for name, t in part.items() if name in trainable},
            [v for state in self.optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)],
            self.device,
        )
        rng = {"cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
        if self.device.type == "cuda":
            rng["cuda"] = base64.b64encode(torch.cuda.get_rng_state(self.device).numpy().tobytes()).decode()
        self.checkpointer.save(
            step,
            model_parts=model_parts,
            optimizer=OptimizerState(self.model, self.optimizer),
            rank_state={"rng": rng, **({"data": self.train_loader.state_dict()} if self.config.data.streaming else {})},
            global_state={
                "step": step,
                "tokens_seen": self.tokens_seen,
                "scheduler": self.scheduler.state_dict(),
                # by reason name: a reason added in a later version leaves older counts in place
                "skipped": {reason: int(n) for reason, n in zip(SKIP_REASONS, self.skipped_total.tolist())},
                # The row plan's position is global (the same on every rank, loadable at any world
                # size); a stream's is per rank and goes in the rank's own state above.
                "data": {"streaming": True} if self.config.data.streaming else self.train_loader.state_dict(),
                "nonfinite": self.nonfinite.state_dict(),
                "wandb_run_id": self.metrics.run_id,
            },
        )

    def _restore(self, path: Path) -> None:
        """Continue from checkpoint ``path``: weights, optimizer, schedule, data position, RNG."""
        state, rank_state = self.checkpointer.load(
            path,
            model_parts=self.model_parts(),
            optimizer=OptimizerState(self.model, self.optimizer),
            allow_base_mismatch=self.config.checkpoint.allow_base_mismatch,
        )
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.skipped_total = torch.tensor(skip_counts(state["skipped"]), dtype=torch.long, device=self.device)
        if "nonfinite" in state:  # absent from checkpoints written before non-finite steps were counted
            self.nonfinite.load_state_dict(state["nonfinite"])
        self.wandb_run_id = state.get("wandb_run_id")
        if "data" not in state:
            raise ValueError(
                f"checkpoint {path} holds per-rank data positions (written before the global row plan); resume it "
                "with the fusiontrain version that wrote it, or start a fresh run"
            )
        self._restore_data_position(path, state["data"], rank_state)
        decode = lambda text: torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)  # noqa: E731
        if rank_state is None:  # saved at another world size: each rank's RNG starts anew, from the step
            torch.manual_seed(self.config.seed + 1 + self.context.rank + 1_000_003 * self.start_step)
        else:
            torch.set_rng_state(decode(rank_state["rng"]["cpu"]))
            if self.device.type == "cuda" and "cuda" in rank_state["rng"]:
                torch.cuda.set_rng_state(decode(rank_state["rng"]["cuda"]), self.device)
        if self.context.is_main:
            logger.warning("resumed from %s at step %d", path, self.start_step)

    def _restore_data_position(self, path: Path, saved: dict[str, Any], rank_state: dict[str, Any] | None) -> None:
        """The loader's position from checkpoint ``path``: global for the row plan, this rank's own
        for a stream (which resumes only at the world size that saved it)."""
        was_streaming = bool(saved.get("streaming"))
        if was_streaming != self.config.data.streaming:
            raise ValueError(
                f"checkpoint {path} was written with data.streaming={str(was_streaming).lower()}; this run has "
                f"data.streaming={str(self.config.data.streaming).lower()}. A data position resumes only in the same kind "
                "of loader: set data.streaming back, or start a fresh run"
            )
        if not was_streaming:
            self.train_loader.load_state_dict(saved)
        elif rank_state is None or "data" not in rank_state:
            raise ValueError(
                f"checkpoint {path} holds per-rank stream positions saved at another world size (this run has "
                f"{self.context.world_size} ranks). A streamed run resumes only on the number of ranks that saved it "
                "(docs/data.md: Streaming data): relaunch with that many, or start a fresh run"
            )
        else:
            self.train_loader.load_state_dict(rank_state["data"])

    def next_host_batches(self) -> list[Batch]:
        """This rank's micro-batches of the next global batch, from the loader, as
        :meth:`train_step` runs them (a benchmark that times the loader with the step calls both)."""
        return [self._complete(next(self._train_batches)) for _ in range(self.grad_accum_steps)]

    def train_step(self, step: int, host_batches: list[Batch] | None = None) -> dict[str, Any]:
        """One optimizer step over this rank's micro-batches of the global batch ``step``
        (:class:`~fusiontrain.train.step.TrainStep`); returns its ``metrics.jsonl`` row. ``host_batches``:
        the step's micro-batches from :meth:`next_host_batches` (read here when None; then the
        step time includes reading them)."""
        started = time.perf_counter()
        if host_batches is None:
            host_batches = self.next_host_batches()
        result = self.step(step, host_batches)
        elapsed = time.perf_counter() - started
        self.preempted_by = self.preemption.verdict(result.preemption_signals)
        self.skipped_total += torch.tensor(result.skipped, dtype=torch.long, device=self.device)
        world = self.context.world_size
        flops = result.flops
        return {
            "mfu": mfu(flops, elapsed, self.peak_flops, world) if self.peak_flops and flops is not None else None,
            "tflops_per_device": flops / elapsed / world / 1e12 if flops is not None else None,
            "loss": result.loss,
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "tokens": result.targets,
            "real_tokens": result.real_tokens,
            "real_token_share": result.real_tokens / result.slots,
            "tokens_per_s": result.real_tokens / elapsed,
            "step_time_s": elapsed,
            "peak_memory_bytes": peak_memory_bytes(self.device, self.host_baseline),
            "skipped": {reason: int(n) for reason, n in zip(SKIP_REASONS, self.skipped_total) if n},
            "skipped_step": result.skipped_step,
            "nonfinite_skipped": self.nonfinite.skipped,
            **result.breakdown(),
        }

    def _complete(self, batch: Batch) -> Batch:
        """``batch`` as every rank must run it: with several ranks, never without an image slot
        (see :func:`~fusiontrain.data.batch.with_placeholder_image`)."""
        if self.context.world_size > 1:
            if isinstance(self.collate_formats, dict):  # every modality's encoder runs on every rank
                return with_placeholder_items(batch, self.collate_formats)
            batch = with_placeholder_image(batch, self.image_format)
        return batch

    def _on_device(self, batch: Batch) -> Batch:
        """``batch``, completed (:meth:`_complete`), with its target positions taken on the host, on
        this rank's device."""
        return self._complete(batch).with_target_index(self.config.loss.ignore_index).to(self.device)

    def _eval_sample(self, dataset: Dataset, index: int) -> Sample:
        """Held-out sample ``index``, or a placeholder that trains nothing if it is bad."""
        try:
            return dataset[index]
        except BadSample as error:
            logger.warning("eval: skipping a sample (%s): %s", error.reason, error)
            return _PLACEHOLDER

    def _loss_sum(self, batch: Batch) -> torch.Tensor:
        settings = self.step.settings
        return loss_sum(
            self.model,
            batch,
            num_output_chunks=settings.num_output_chunks,
            ignore_index=settings.ignore_index,
            flex_attention=settings.flex_attention,
            loss_chunk_rows=settings.loss_chunk_rows,
        )

    def evaluate_all(self) -> dict[str, float]:
        """The eval metrics: ``eval_loss`` over every eval set (per target token, all sets'
        tokens together) and, with several sets, ``eval_loss/<name>`` of each."""
        sums = [self.evaluate_sums(dataset) for _, dataset in self.eval_sets]
        metrics = {"eval_loss": sum(loss for loss, _ in sums) / max(1, sum(targets for _, targets in sums))}
        if len(self.eval_sets) > 1:
            for (name, _), (loss, targets) in zip(self.eval_sets, sums):
                metrics[f"eval_loss/{name}"] = loss / max(1, targets)
        return metrics

    def evaluate(self) -> float:
        """The eval loss over every eval set (see :meth:`evaluate_all`)."""
        return self.evaluate_all()["eval_loss"]

    @torch.no_grad()
    def evaluate_sums(self, dataset: Dataset) -> tuple[float, int]:
        """``(loss sum, target tokens)`` over the first ``eval.num_samples`` samples of
        ``dataset`` (rank r takes every r-th), so the values do not depend on the world size."""
        self.model.eval()
        rank, size = self.context.rank, self.context.world_size
        total = min(self.config.eval.num_samples, len(dataset))
        micro = self.config.batch.micro_batch_size
        per_rank = -(-total // size)
        # Every rank runs the same number of forwards (FSDP's collectives need all ranks); slots
        # past the end, and bad samples, hold a one-token placeholder with no target.
        slots = [rank + size * j for j in range(-(-per_rank // micro) * micro)]
        loss_sum = torch.zeros((), device=self.device)
        targets = torch.zeros((), dtype=torch.long, device=self.device)
        collate = collate_padding_free if self.config.data.padding_free else collate_padded
        for start in range(0, len(slots), micro):
            samples = [self._eval_sample(dataset, i) if i < total else _PLACEHOLDER for i in slots[start : start + micro]]
            batch = self._on_device(
                collate(samples, self.config.batch.seq_len, self.collate_formats, ignore_index=self.config.loss.ignore_index)
            )
            loss_sum += self._loss_sum(batch)
            targets += count_targets(batch.labels, self.config.loss.ignore_index)
        reshard(self.model)
        self.model.train()
        sums = torch.stack([loss_sum.double(), targets.double()])
        loss, count = distributed.all_reduce_sum(sums, "eval loss and target count").tolist()
        return loss, int(count)

    @staticmethod
    def _due(every: int, step: int) -> bool:
        return every > 0 and (step + 1) % every == 0

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) values of the trainable parameters, by canonical name, on the CPU."""
        state = {}
        for name, param in canonical_parameters(self.model).items():
            if param.requires_grad:
                full = param.full_tensor() if hasattr(param, "full_tensor") else param
                state[name] = full.detach().cpu().clone()
        return state

    def close(self) -> None:
        """Leave the process group (and give SIGTERM / SIGUSR1 back, for a trainer never run)."""
        self.preemption.uninstall()
        distributed.shutdown()


def skip_counts(saved: dict[str, int] | list[int]) -> list[int]:
    """The skipped-sample counts of a checkpoint, in :data:`SKIP_REASONS` order: saved by reason
    name (a reason unknown here is an error naming it), or as the positional list that checkpoints
    written before 2026-12-06 hold (in the reason order of that time, which was this one)."""
    if isinstance(saved, list):
        if len(saved) != len(SKIP_REASONS):
            raise ValueError(
                f"the checkpoint counts {len(saved)} skip reasons by position, this version knows {len(SKIP_REASONS)}; "
                "resume it with the fusiontrain version that wrote it"
            )
        return [int(n) for n in saved]
    unknown = sorted(set(saved) - set(SKIP_REASONS))
    if unknown:
        raise ValueError(f"the checkpoint counts skipped samples of reasons this version does not know: {unknown}")
    return [int(saved.get(reason, 0)) for reason in SKIP_REASONS]

