"""GPU readiness check: ``python scripts/gpu_check.py [--out DIR]`` on a machine with one CUDA GPU.

CI runs on CPUs only, so the CUDA path of fusiontrain is exercised nowhere else. This script
proves it in five to eight minutes on one GPU and prints one table, a row per check:

- ``env``: torch, CUDA, the GPU and its capability (no pass/fail).
- ``nccl``: the Trainer's process group is nccl (a world of one: one GPU cannot show inter-GPU
  traffic), and an all-reduce and a broadcast of CUDA tensors give the right values.
- ``flex_vs_sdpa/{fp32,bf16}``: compiled ``flex_attention`` forward and backward over packed rows
  (the block-causal ``BlockMask`` fusiontrain builds from segment ids, grouped-query heads)
  against ``scaled_dot_product_attention`` with the dense boolean mask; both are measured against
  a float64 SDPA reference, and flex must be as close to it as SDPA is (times 2, plus a floor).
- ``frozen_projection_loss/{fp32,bf16}``: the chunked loss of a frozen output projection (one
  logits buffer for all chunks, ``log_softmax`` in place) against full fp32 logits at Llama 3's
  vocabulary (128,256): loss and hidden-state gradient (relative 1e-5 in fp32, 1e-2 in bf16).
- ``model_flex_vs_dense``: the whole benchmark Mllama (63M parameters, FSDP2 over nccl, fp32):
  loss and every trainable gradient of one packed micro-batch through the flex ``BlockMask``s
  (self- and cross-attention) against the packed layouts (SDPA per segment, cross-attention on
  the gathered tokens: the CPU path; relative 1e-4; TF32 is off, as by default).
- ``fused_adamw``: the Trainer's AdamW is ``fused``, and 10 fused steps equal 10 single-tensor
  steps on the same parameters and gradients (relative 1e-5).
- ``train_bf16_vs_fp32``: the tiny Mllama trained 20 steps through the CLI and torchrun on the GPU
  with ``parallel.mixed_precision=bf16`` and ``fp32``: every step's loss within 3e-2 relative
  (bf16 has 8 mantissa bits; over 20 AdamW steps the runs drift apart slowly).
- ``train_gpu_vs_cpu``: the same fp32 run on the GPU (nccl, flex) and on the CPU (gloo, SDPA):
  every step's loss within 1e-3 relative.
- ``train_with_eval``: a bf16 run with an eval every 5 steps (an eval between steps once broke
  the next step: see ``fusiontrain.parallel.fsdp.reshard``).
- ``resume_on_gpu``: the fp32 GPU run stopped after 10 steps (a DCP checkpoint) and resumed ends
  with the uninterrupted run's losses for steps 11-20 (relative 1e-4: cuDNN / SDPA backward
  kernels may reduce in another order from run to run).
- ``async_checkpoints_nccl``: an fp32 run with ``checkpoint.async_save`` every 5 steps under the
  nccl default group (the saves run on the gloo checkpoint group): every checkpoint intact, the
  losses those of the synchronous run (relative 1e-4).
- ``features_gpu_vs_cpu``: the features merged since the first GPU run, together, as a user turns
  them on: LoRA (rank 4), padding-free rows, activation checkpointing of every block with the
  checkpointed activations offloaded to pinned host memory on a side stream, and ``torch.compile``
  of every block (encoder and fusion layers included), fp32 on the GPU, against the same run on
  the CPU (no compile, no offloading): every step's loss within 1e-3 relative.
- ``padded_gpu_vs_cpu``: padded rows (``data.packing=false``, ``data.padding_free=false``), whose
  rows with fewer images than the batch's widest leave padding image slots that the encoder skips
  through the host-known ``image_slots`` index: GPU against CPU, every step's loss within 1e-3.
- ``bf16_question/{fp32,bf16}``: ``benchmarks/gpu_scale.py --shapes 1b --skip-hf`` in each
  precision: real tokens/s, MFU, the per-phase split of a step (host, forward, loss, backward,
  optimizer, each between ``torch.cuda.synchronize`` calls) and one profiled step's top operators
  by CUDA time, so that a bf16 step slower than fp32 names where its time goes.
- ``plan_vs_cuda_peak/<config>``: ``python -m fusiontrain plan --gpu h200`` against the CUDA
  allocator's measured peak (``torch.cuda.max_memory_allocated``) of 3 training steps of the
  benchmark Mllama, for a few configurations (error reported; within 10% passes).
- ``vs_hf/{fp32,bf16}``: ``benchmarks/vs_hf.py --device cuda`` (HF transformers against
  fusiontrain padding-free, on padded rows and packed, and torchtune padded, same weights and
  data); the step-0 agreement must hold.

The training runs of one phase go side by side on the one GPU (they are tiny; only their numbers
matter, not their speed); ``vs_hf`` runs alone, last, since it times steps. Everything is written
to ``DIR`` (default ``gpu_check_out/``): ``gpu_check.json``, ``gpu_check.md`` (the table) and one
log per subprocess. The exit code is 1 when any check fails.

Needs: the fusiontrain repo (run from its root or anywhere; the script puts the repo first on
``PYTHONPATH``), torch with CUDA, transformers, torchdata, safetensors, pyyaml, Pillow.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

TINY_CONFIG = REPO / "configs" / "tiny.yaml"
TRAIN_STEPS = 20
BF16_RTOL = 3e-2
GPU_VS_CPU_RTOL = 1e-3
RESUME_RTOL = 1e-4
PLAN_TOLERANCE = 0.10
SUBPROCESS_TIMEOUT_S = 300


@dataclass
class Check:
    """One row of the table."""

    name: str
    status: str = "-"  # PASS, FAIL, ERROR, INFO
    measured: str = ""
    bound: str = ""
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


class Report:
    """The checks so far, written to ``out`` after each one (a killed run still leaves them)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.checks: list[Check] = []

    def run(self, name: str, fn: Callable[[], Check | list[Check]]) -> None:
        started = time.perf_counter()
        try:
            result = fn()
            results = result if isinstance(result, list) else [result]
        except Exception as error:  # a check that breaks is a row, not the end of the script
            results = [Check(name, "ERROR", f"{type(error).__name__}: {error}"[:300])]
            (self.out / f"{name.replace('/', '_')}.error.txt").write_text(traceback.format_exc())
        seconds = time.perf_counter() - started
        for check in results:
            check.seconds = check.seconds or seconds
            self.checks.append(check)
            print(f"[gpu_check] {check.name}: {check.status} {check.measured} ({check.seconds:.0f} s)", flush=True)
        self.write()

    def table(self) -> str:
        rows = [["check", "status", "measured", "bound", "s"]]
        rows += [[c.name, c.status, c.measured, c.bound, f"{c.seconds:.0f}"] for c in self.checks]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in rows]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines)

    def write(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps([asdict(c) for c in self.checks], indent=2, default=str))
        (self.out / "gpu_check.md").write_text(self.table() + "\n")

    @property
    def failed(self) -> bool:
        return any(c.status in ("FAIL", "ERROR") for c in self.checks)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (NaN anywhere gives NaN, which fails every bound)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# -- in-process checks ---------------------------------------------------------------------------


def check_env() -> Check:
    import transformers

    props = torch.cuda.get_device_properties(0)
    details = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "gpu": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        "python": platform.python_version(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }
    measured = f"{props.name}, sm_{props.major}{props.minor}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return Check("env", "INFO", measured, details=details)


def check_nccl() -> Check:
    import torch.distributed as dist

    from fusiontrain.parallel import distributed

    context = distributed.init_distributed()
    backend = dist.get_backend()
    values = torch.arange(4, dtype=torch.float32, device=context.device) + 1
    dist.all_reduce(values)
    shared = torch.full((3,), 7.0, device=context.device)
    dist.broadcast(shared, src=0)
    torch.cuda.synchronize()
    ok = backend == "nccl" and values.tolist() == [1.0, 2.0, 3.0, 4.0] and shared.tolist() == [7.0] * 3
    return Check("nccl", verdict(ok), f"backend {backend}, world {dist.get_world_size()}, device {context.device}",
                 "nccl; all-reduce and broadcast exact", details={"nccl": torch.cuda.nccl.version()})


def packed_segments(b: int, s: int, generator: torch.Generator) -> torch.Tensor:
    """``[b, s]`` segment ids of rows packed with samples of random lengths (the tail is padding,
    a segment of its own, as the collator makes it)."""
    rows = []
    for _ in range(b):
        ids, start, segment = torch.empty(s, dtype=torch.long), 0, 0
        while start < s - 64:
            length = int(torch.randint(16, s // 3, (1,), generator=generator))
            ids[start : start + length] = segment
            start, segment = start + length, segment + 1
        ids[start:] = segment
        rows.append(ids)
    return torch.stack(rows)


def check_flex_vs_sdpa() -> list[Check]:
    from fusiontrain.modules.attention import attend
    from fusiontrain.modules.masks import block_causal_block_mask, block_causal_mask

    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(0)
    b, n_h, n_kv, s, h_d = 2, 16, 4, 2048, 64
    segments = packed_segments(b, s, generator).to(device)
    dense, block = block_causal_mask(segments), block_causal_block_mask(segments)
    q = torch.randn(b, n_h, s, h_d, generator=generator).to(device)
    k = torch.randn(b, n_kv, s, h_d, generator=generator).to(device)
    v = torch.randn(b, n_kv, s, h_d, generator=generator).to(device)
    grad_out = torch.randn(b, n_h, s, h_d, generator=generator).to(device)

    def run(dtype: torch.dtype, mask: Any) -> list[torch.Tensor]:
        leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v)]
        out = attend(*leaves, mask=mask)
        out.backward(grad_out.to(dtype))
        return [out.detach()] + [t.grad for t in leaves]

    reference = run(torch.float64, dense)
    checks = []
    for name, dtype, floor in (("fp32", torch.float32, 1e-4), ("bf16", torch.bfloat16, 1e-2)):
        flex, sdpa = run(dtype, block), run(dtype, dense)
        torch.cuda.synchronize()
        labels = ("out", "dq", "dk", "dv")
        flex_err = {label: relative(x, r) for label, x, r in zip(labels, flex, reference)}
        sdpa_err = {label: relative(x, r) for label, x, r in zip(labels, sdpa, reference)}
        between = {label: relative(x, y) for label, x, y in zip(labels, flex, sdpa)}
        ok = all(flex_err[label] <= 2 * sdpa_err[label] + floor for label in labels)
        worst = max(labels, key=lambda label: flex_err[label])
        checks.append(Check(
            f"flex_vs_sdpa/{name}", verdict(ok),
            f"worst {worst}: flex {flex_err[worst]:.1e}, sdpa {sdpa_err[worst]:.1e} vs fp64; flex vs sdpa {between[worst]:.1e}",
            f"flex err <= 2 x sdpa err + {floor:.0e}",
            details={"flex_vs_fp64": flex_err, "sdpa_vs_fp64": sdpa_err, "flex_vs_sdpa": between,
                     "shape": {"b": b, "n_h": n_h, "n_kv": n_kv, "s": s, "h_d": h_d},
                     "segments_per_row": [int(row.max()) + 1 for row in segments]},
        ))
    return checks


def check_frozen_projection_loss(device: str = "cuda", seq: int = 4096) -> list[Check]:
    """The chunked loss of a frozen output projection (``fusiontrain.train.loss``: one fp32 logits
    buffer for every chunk, ``log_softmax`` written in place) against the full fp32 logits, at
    Llama 3's vocabulary: loss and the hidden states' gradient."""
    from fusiontrain.train.loss import chunked_cross_entropy_sum, full_cross_entropy_sum

    generator = torch.Generator().manual_seed(0)
    vocab, width = 128_256, 1024
    hidden = torch.randn(1, seq, width, generator=generator)
    labels = torch.randint(0, vocab, (1, seq), generator=generator)
    labels[0, : seq // 8] = -100  # a prompt
    weight = torch.randn(vocab, width, generator=generator) / width**0.5
    checks = []
    for name, dtype, bound in (("fp32", torch.float32, 1e-5), ("bf16", torch.bfloat16, 1e-2)):
        output = torch.nn.Linear(width, vocab, bias=False, device=device, dtype=dtype).requires_grad_(False)
        output.weight.copy_(weight)
        results = []
        for loss_of in (
            lambda h: chunked_cross_entropy_sum(h, labels.to(device), output, num_chunks=16, chunk_rows=seq // 16),
            lambda h: full_cross_entropy_sum(h, labels.to(device), output),
        ):
            leaf = hidden.to(device=device, dtype=dtype).detach().clone().requires_grad_()
            loss = loss_of(leaf)
            loss.backward()
            results.append((loss.detach(), leaf.grad))
        (chunked_loss, chunked_grad), (full_loss, full_grad) = results
        loss_err, grad_err = relative(chunked_loss, full_loss), relative(chunked_grad, full_grad)
        checks.append(Check(
            f"frozen_projection_loss/{name}", verdict(loss_err <= bound and grad_err <= bound),
            f"loss {loss_err:.1e}, hidden grad {grad_err:.1e} vs full logits", f"{bound:.0e} relative",
            details={"chunked": float(chunked_loss), "full": float(full_loss), "vocab": vocab, "width": width, "rows": seq},
        ))
    return checks


def bench_trainer(out: Path, extra: list[str]) -> Any:
    """A Trainer of the benchmark Mllama on this GPU (fp32 compute, packed rows of 1024)."""
    from benchmarks.memory import model_folder
    from fusiontrain.config import load_config
    from fusiontrain.train.trainer import Trainer

    folder = model_folder("bench")
    overrides = [
        f"model.hf_mllama={folder}", f"output_dir={out}", "max_steps=10", "model.dtype=float32",
        "data.format=synthetic", "data.synthetic_lengths=long_tail", "data.synthetic_max_text=1024",
        "data.synthetic_samples=512", "data.max_images_per_row=16", "data.num_workers=0",
        "batch.seq_len=1024", "batch.micro_batch_size=2", "batch.global_batch_size=2",
        "eval.every_n_steps=0", "checkpoint.every_n_steps=0", "logging.every_n_steps=0", "logging.wandb.mode=disabled",
        *extra,
    ]
    return Trainer(load_config(None, overrides))


def check_model_and_optimizer(out: Path) -> list[Check]:
    from fusiontrain.train.loss import chunked_cross_entropy_sum

    trainer = bench_trainer(out / "model_check", ["parallel.mixed_precision=fp32"])
    model = trainer.model
    batch = trainer._on_device(next(trainer._train_batches))
    if batch.segment_ids is None:
        raise AssertionError("the benchmark batch is not packed")
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]

    def loss_and_grads(flex: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        hidden = model(batch.tokens, **batch.model_inputs(flex=flex))
        loss = chunked_cross_entropy_sum(hidden, batch.labels, model.decoder.output, num_chunks=8, ignore_index=-100)
        loss.backward()
        grads = {}
        for name, p in trainable:
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            grads[name] = grad.detach().clone()
        return loss.detach(), grads

    flex_loss, flex_grads = loss_and_grads(True)
    dense_loss, dense_grads = loss_and_grads(False)
    model.zero_grad(set_to_none=True)
    loss_err = relative(flex_loss, dense_loss)
    grad_errs = {name: relative(flex_grads[name], dense_grads[name]) for name in flex_grads}
    worst = max(grad_errs, key=grad_errs.get)
    ok = loss_err <= 1e-4 and grad_errs[worst] <= 1e-4
    segments = int(sum(int(row.max()) + 1 for row in batch.segment_ids))
    model_check = Check(
        "model_flex_vs_dense", verdict(ok),
        f"loss {loss_err:.1e}; worst grad {grad_errs[worst]:.1e} ({worst})", "1e-4 relative",
        details={"loss_flex": float(flex_loss), "loss_dense": float(dense_loss), "grad_errors": grad_errs,
                 "packed_segments": segments, "rows": int(batch.tokens.shape[0]), "seq_len": int(batch.tokens.shape[1])},
    )

    # The Trainer's own optimizer, and fused against single-tensor AdamW on identical state.
    group = trainer.optimizer.param_groups[0]
    is_fused = bool(group.get("fused"))
    generator = torch.Generator().manual_seed(1)
    shapes = [(1024, 512), (512,), (3, 7, 11), (1,)]
    params = {kind: [torch.randn(shape, generator=generator).cuda().requires_grad_() for shape in shapes] for kind in ("fused", "single")}
    for a, b in zip(params["fused"], params["single"]):
        b.data.copy_(a.data)
    initial = [p.detach().clone() for p in params["fused"]]
    optimizers = {
        "fused": torch.optim.AdamW(params["fused"], lr=1e-3, weight_decay=0.1, fused=True),
        "single": torch.optim.AdamW(params["single"], lr=1e-3, weight_decay=0.1, foreach=False),
    }
    for _ in range(10):
        grads = [torch.randn(shape, generator=generator).cuda() for shape in shapes]
        for kind, optimizer in optimizers.items():
            for p, g in zip(params[kind], grads):
                p.grad = g.clone()
            optimizer.step()
    torch.cuda.synchronize()
    errs = [relative(a.detach(), b.detach()) for a, b in zip(params["fused"], params["single"])]
    moved = min(relative(a.detach(), start) for a, start in zip(params["fused"], initial))  # the steps did something
    ok = is_fused and max(errs) <= 1e-5 and moved > 1e-4
    adam_check = Check(
        "fused_adamw", verdict(ok), f"Trainer's AdamW fused={is_fused}; fused vs single-tensor after 10 steps {max(errs):.1e}",
        "fused; 1e-5 relative", details={"errors": errs, "param_group": {k: v for k, v in group.items() if k != "params"}},
    )
    trainer.metrics.close()
    del trainer
    torch.cuda.empty_cache()
    return [model_check, adam_check]


# -- subprocess checks ---------------------------------------------------------------------------


class Launch:
    """A background ``python`` subprocess; its stdout goes to ``out/<name>.log``, its stderr to
    ``out/<name>.err``."""

    def __init__(self, name: str, args: list[str], out: Path, *, cpu: bool = False) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "2", "TORCHINDUCTOR_COMPILE_THREADS": "2", "WANDB_MODE": "disabled",
               "PYTHONUNBUFFERED": "1"}
        if cpu:
            env["CUDA_VISIBLE_DEVICES"] = ""
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # this process's world of one
            env.pop(key, None)
        self.name = name
        self.log, self.err = out / f"{name}.log", out / f"{name}.err"
        self.started = time.perf_counter()
        self.process = subprocess.Popen([sys.executable, *args], stdout=self.log.open("w"), stderr=self.err.open("w"),
                                        env=env, cwd=REPO)

    def settle(self) -> int | None:
        """Wait for the process to end (killed past the timeout) without judging it; its exit code."""
        try:
            return self.process.wait(timeout=max(1.0, SUBPROCESS_TIMEOUT_S - (time.perf_counter() - self.started)))
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def wait(self) -> float:
        """Seconds it ran; raises with the log's tail when it failed."""
        try:
            code = self.process.wait(timeout=max(1.0, SUBPROCESS_TIMEOUT_S - (time.perf_counter() - self.started)))
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise RuntimeError(f"{self.name} ran past {SUBPROCESS_TIMEOUT_S} s; log: {self.log}") from None
        if code != 0:
            tail = "\n".join((self.log.read_text() + self.err.read_text()).splitlines()[-15:])
            raise RuntimeError(f"{self.name} exited {code}:\n{tail}")
        return time.perf_counter() - self.started


def train(name: str, out: Path, tiny: Path, extra: list[str], *, cpu: bool = False, log: str | None = None) -> Launch:
    """A 20-step run of the tiny Mllama through torchrun and the CLI, into ``out/name``."""
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "fusiontrain", "train",
            "--config", str(TINY_CONFIG), f"model.hf_mllama={tiny}", f"output_dir={out / name}", f"max_steps={TRAIN_STEPS}",
            "data.num_workers=0", "logging.wandb.mode=disabled", "logging.every_n_steps=5", "eval.every_n_steps=0", *extra]
    return Launch(log or name, args, out, cpu=cpu)


def losses(out: Path, name: str) -> list[float]:
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def worst_relative(a: list[float], b: list[float]) -> float:
    if len(a) != len(b) or not a:
        raise AssertionError(f"loss curves of different lengths: {len(a)} and {len(b)}")
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


FEATURES = ["parallel.mixed_precision=fp32", "model.lora.rank=4", "data.packing=false", "data.padding_free=true",
            "parallel.activation_checkpointing=full"]
PADDED = ["parallel.mixed_precision=fp32", "data.packing=false", "data.padding_free=false"]

PLAN_CONFIGS: dict[str, list[str]] = {
    "packed": ["batch.global_batch_size=2"],
    "packed_full_ac": ["batch.global_batch_size=2", "parallel.activation_checkpointing=full"],
    "4_micro_batches": ["batch.global_batch_size=8"],
}
PLAN_FIXED = ["data.synthetic_lengths=fixed", "data.synthetic_max_text=255", "batch.seq_len=1024", "batch.micro_batch_size=2",
              "data.max_images_per_row=4"]


def plan_launches(out: Path, bench: Path) -> dict[str, tuple[Launch, Launch]]:
    launches = {}
    for name, extra in PLAN_CONFIGS.items():
        overrides = [f"model.hf_mllama={bench}", *PLAN_FIXED, *extra]
        plan = Launch(f"plan_{name}", ["-m", "fusiontrain", "plan", "--config", str(TINY_CONFIG), "--gpus", "1", "--gpu", "h200",
                                       "--json", *overrides], out)
        run = Launch(f"measure_{name}", ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m",
                                         "fusiontrain", "train", "--config", str(TINY_CONFIG), *overrides,
                                         f"output_dir={out / ('measure_' + name)}", "max_steps=3", "data.num_workers=0",
                                         "eval.every_n_steps=0", "checkpoint.every_n_steps=0", "logging.every_n_steps=0",
                                         "logging.wandb.mode=disabled"], out)
        launches[name] = (plan, run)
    return launches


def plan_checks(out: Path, launches: dict[str, tuple[Launch, Launch]]) -> list[Check]:
    checks = []
    for name, (plan, run) in launches.items():
        try:
            finished = [launch.settle() for launch in (plan, run)]  # both end before either is judged
            plan.wait()
            seconds = run.wait()
            del finished
            predicted = json.loads(plan.log.read_text())
            rows = [json.loads(line) for line in (out / f"measure_{name}" / "metrics.jsonl").read_text().splitlines()]
            measured = max(row["peak_memory_bytes"] for row in rows if "peak_memory_bytes" in row)
            error = (predicted["peak_bytes"] - measured) / measured
            checks.append(Check(
                f"plan_vs_cuda_peak/{name}", verdict(abs(error) <= PLAN_TOLERANCE),
                f"plan {predicted['peak_bytes'] / 2**20:,.0f} MiB, measured {measured / 2**20:,.0f} MiB ({error:+.1%})",
                f"|error| <= {PLAN_TOLERANCE:.0%}", seconds,
                details={"predicted": predicted, "measured_bytes": measured},
            ))
        except Exception as error:
            checks.append(Check(f"plan_vs_cuda_peak/{name}", "ERROR", f"{type(error).__name__}: {error}"[:300]))
    return checks


def vs_hf_check(out: Path, precision: str) -> Check:
    json_path = out / f"vs_hf_{precision}.json"
    launch = Launch(f"vs_hf_{precision}", ["benchmarks/vs_hf.py", "--device", "cuda", "--precision", precision, "--warmup", "1",
                                           "--rounds", "3", "--steps-per-round", "2", "--json", str(json_path)], out)
    try:
        seconds = launch.wait()
    except RuntimeError:
        if not json_path.exists():
            raise
        seconds = time.perf_counter() - launch.started
    result = json.loads(json_path.read_text())
    variants = result["variants"]
    speed = ", ".join(f"{key} {v['tokens_per_s']['median']:,.0f} tok/s" for key, v in variants.items())
    return Check(f"vs_hf/{precision}", verdict(result["step0"]["agree"]), speed,
                 f"step-0 losses agree within {result['step0']['rtol']:.0e}", seconds, details=result)


def bf16_question(out: Path, precision: str) -> Check:
    """``benchmarks/gpu_scale.py`` on the 1B shape, ours only, in ``precision``, with the per-phase
    split and one profiled step (INFO: the figures are the answer, there is no bound)."""
    json_path = out / f"gpu_scale_1b_{precision}.json"
    launch = Launch(f"bf16_question_{precision}", [str(REPO / "benchmarks" / "gpu_scale.py"), "--shapes", "1b", "--skip-hf",
                                                   "--steps", "4", "--precision", precision, "--profile", "--json", str(json_path)], out)
    seconds = launch.wait()
    entry = json.loads(json_path.read_text())["shapes"]["1b"]["fusiontrain"]
    phases = ", ".join(f"{name} {value * 1e3:.0f} ms" for name, value in entry["phases_s"].items())
    return Check(f"bf16_question/{precision}", "INFO", f"{entry['real_tokens_per_s']:,.0f} real tok/s, MFU {entry['mfu']:.1%}; "
                 f"{phases}", "", seconds, details=entry)


# -- main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "gpu_check_out", help="where the table, JSON and logs go")
    parser.add_argument("--skip-vs-hf", action="store_true", help="leave out the vs_hf benchmark (about 2 minutes)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("no CUDA device is visible to torch: this script checks the GPU path (CPU CI covers the rest)")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False  # the default; fp32 comparisons below rely on it
    started = time.perf_counter()
    report = Report(args.out)

    from benchmarks.memory import model_folder
    from fusiontrain import tiny

    tiny_folder, _ = tiny.save_tiny_mllama(args.out / "tiny_mllama")
    bench = model_folder("bench")

    # Phase 1: training runs in the background while this process checks kernels and the model.
    runs = {
        "fp32": train("fp32", args.out, tiny_folder, ["parallel.mixed_precision=fp32"]),
        "bf16": train("bf16", args.out, tiny_folder, ["parallel.mixed_precision=bf16"]),
        "cpu_fp32": train("cpu_fp32", args.out, tiny_folder, ["parallel.mixed_precision=fp32"], cpu=True),
        "stopped": train("stopped", args.out, tiny_folder, ["parallel.mixed_precision=fp32", "stop_after_steps=10",
                                                              "checkpoint.every_n_steps=10"]),
        # An eval every 5 steps between training steps (FSDP2 units left mid-forward by an eval
        # broke the next step on torch 2.11; see fusiontrain.parallel.fsdp.reshard).
        "eval": train("eval", args.out, tiny_folder, ["parallel.mixed_precision=bf16", "eval.every_n_steps=5"]),
        # Async checkpoints under nccl: DCP's async save needs a CPU backend, which the checkpoint
        # group (gloo) gives it beside the nccl default group (fusiontrain.parallel.distributed).
        "async": train("async", args.out, tiny_folder, ["parallel.mixed_precision=fp32", "checkpoint.async_save=true",
                                                          "checkpoint.every_n_steps=5", "checkpoint.keep_last_n=0"]),
    }
    # Features merged since the first GPU run, together (LoRA, padding-free, offloading, compile),
    # and padded rows with padding image slots: GPU against CPU.
    runs["features"] = train("features", args.out, tiny_folder, [*FEATURES, "parallel.activation_offloading=checkpointed",
                                                                    "parallel.compile=true"])
    runs["features_cpu"] = train("features_cpu", args.out, tiny_folder, FEATURES, cpu=True)
    runs["padded"] = train("padded", args.out, tiny_folder, PADDED)
    runs["padded_cpu"] = train("padded_cpu", args.out, tiny_folder, PADDED, cpu=True)
    plans = plan_launches(args.out, bench)
    report.run("env", check_env)
    report.run("nccl", check_nccl)
    report.run("flex_vs_sdpa", check_flex_vs_sdpa)
    report.run("frozen_projection_loss", check_frozen_projection_loss)
    report.run("model_flex_vs_dense", lambda: check_model_and_optimizer(args.out))

    def compare(name: str, a: str, b: str, rtol: float, bound: str) -> Check:
        for key in (a, b):
            runs[key].wait()
        worst = worst_relative(losses(args.out, a), losses(args.out, b))
        return Check(name, verdict(worst <= rtol), f"worst step's loss differs by {worst:.1e} relative", bound,
                     details={a: losses(args.out, a), b: losses(args.out, b)})

    report.run("train_bf16_vs_fp32", lambda: compare("train_bf16_vs_fp32", "bf16", "fp32", BF16_RTOL, f"{BF16_RTOL:.0e} relative"))
    report.run("train_gpu_vs_cpu", lambda: compare("train_gpu_vs_cpu", "fp32", "cpu_fp32", GPU_VS_CPU_RTOL,
                                                   f"{GPU_VS_CPU_RTOL:.0e} relative"))

    def resume() -> Check:
        runs["stopped"].wait()
        resumed = train("stopped", args.out, tiny_folder, ["parallel.mixed_precision=fp32", "checkpoint.resume=auto",
                                                           "checkpoint.every_n_steps=10"], log="resumed")
        resumed.wait()
        runs["fp32"].wait()
        after = losses(args.out, "stopped")[-10:]
        reference = losses(args.out, "fp32")[-10:]
        worst = worst_relative(after, reference)
        return Check("resume_on_gpu", verdict(worst <= RESUME_RTOL), f"steps 11-20 after resume: {worst:.1e} relative",
                     f"{RESUME_RTOL:.0e} relative", details={"resumed": after, "uninterrupted": reference})

    report.run("resume_on_gpu", resume)

    def evals() -> Check:
        runs["eval"].wait()
        rows = [json.loads(line) for line in (args.out / "eval" / "metrics.jsonl").read_text().splitlines()]
        evals = [row["eval_loss"] for row in rows if "eval_loss" in row]
        ok = len(rows) == TRAIN_STEPS and len(evals) == TRAIN_STEPS // 5 and all(map(math.isfinite, evals))
        return Check("train_with_eval", verdict(ok), f"{len(rows)} steps, eval losses {', '.join(f'{x:.3f}' for x in evals)}",
                     f"{TRAIN_STEPS} steps, {TRAIN_STEPS // 5} finite evals")

    report.run("train_with_eval", evals)

    def async_checkpoints() -> Check:
        from fusiontrain.checkpoint.layout import CheckpointError, verify_checkpoint

        runs["async"].wait()
        runs["fp32"].wait()
        steps = list(range(5, TRAIN_STEPS + 1, 5))
        intact = []
        for step in steps:
            try:
                verify_checkpoint(args.out / "async" / "checkpoints" / f"step_{step}")
                intact.append(step)
            except CheckpointError:
                pass
        worst = worst_relative(losses(args.out, "async"), losses(args.out, "fp32"))
        ok = intact == steps and worst <= RESUME_RTOL
        return Check("async_checkpoints_nccl", verdict(ok), f"intact checkpoints {intact}; losses vs synchronous run "
                     f"{worst:.1e} relative", f"steps {steps} intact, {RESUME_RTOL:.0e} relative")

    report.run("async_checkpoints_nccl", async_checkpoints)
    report.run("features_gpu_vs_cpu", lambda: compare("features_gpu_vs_cpu", "features", "features_cpu", GPU_VS_CPU_RTOL,
                                                      f"{GPU_VS_CPU_RTOL:.0e} relative"))
    report.run("padded_gpu_vs_cpu", lambda: compare("padded_gpu_vs_cpu", "padded", "padded_cpu", GPU_VS_CPU_RTOL,
                                                    f"{GPU_VS_CPU_RTOL:.0e} relative"))
    report.run("plan_vs_cuda_peak", lambda: plan_checks(args.out, plans))
    for launch in [*runs.values(), *(launch for pair in plans.values() for launch in pair)]:
        launch.settle()  # nothing else may run on the GPU while vs_hf times its steps
    for precision in ("fp32", "bf16"):
        report.run(f"bf16_question/{precision}", lambda precision=precision: bf16_question(args.out, precision))
    if not args.skip_vs_hf:
        for precision in ("fp32", "bf16"):
            report.run(f"vs_hf/{precision}", lambda precision=precision: vs_hf_check(args.out, precision))

    print(f"\nfusiontrain GPU check, {time.perf_counter() - started:.0f} s, commit files at {REPO}")
    print(report.table())
    from fusiontrain.parallel import distributed

    distributed.shutdown()
    sys.exit(1 if report.failed else 0)


if __name__ == "__main__":
    main()
