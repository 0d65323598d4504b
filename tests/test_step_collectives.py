"""The collectives of a training step (fusiontrain/train/step.py), counted on 2 gloo ranks with the
real Trainer (tests/helpers/step_collectives_probe.py): two small all-reduces per step (the counts
before the forward; loss, grad norm, non-finite and preemption flags after backward), the output
projection gathered once per micro-batch, by its FSDP unit (it used to be gathered three times:
the unit's forward, the loss's ``full_tensor()``, the unit's backward), and the token embeddings
gathered once per micro-batch, in forward (their backward reads no weight; they used to be
gathered again for it); and the planner's time model counts exactly the bytes these gathers move
(its traced micro-batch's). A change that adds a collective to every step fails here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.helpers.launch import REPO_ROOT, run_world

PROBE = str(REPO_ROOT / "tests" / "helpers" / "step_collectives_probe.py")
TINY_CONFIG = str(REPO_ROOT / "configs" / "tiny.yaml")
STEPS = 4
MICRO_BATCHES = 2  # per rank and step: global batch 8 = 2 ranks x 2 rows x 2 micro-batches


def test_a_step_issues_two_small_all_reduces_and_gathers_the_output_projection_and_embeddings_once_per_micro_batch(
    tmp_path: Path, tiny_mllama_dir: Path
) -> None:
    out = tmp_path / "collectives.json"
    shape = [f"model.hf_mllama={tiny_mllama_dir}", "batch.micro_batch_size=2", "batch.global_batch_size=8"]
    _, (plan,) = run_world(
        [PROBE, str(out), "--config", TINY_CONFIG, *shape, f"output_dir={tmp_path / 'run'}", f"max_steps={STEPS}",
         "eval.every_n_steps=0", "logging.every_n_steps=0", "data.num_workers=0", "optim.max_grad_norm=0.1"],
        nproc=2,
        beside=[[sys.executable, "-m", "fusiontrain", "plan", "--config", TINY_CONFIG, "--gpus", "2", "--gpu", "cpu", "--json", *shape]],
        timeout=240,
    )
    report = json.loads(out.read_text())
    steps = report["steps"]
    assert len(steps) == STEPS
    assert report["output_unit_gathers"] == [MICRO_BATCHES] * STEPS
    assert report["embedding_unit_gathers"] == [MICRO_BATCHES] * STEPS  # forward only
    # The planner's time model counts what FSDP gathers: its traced micro-batch's all-gathers.
    planned = json.loads(plan.stdout[plan.stdout.index("{") :])["gathered_bytes_per_micro_batch"]
    assert planned > 0 and report["gathered_bytes"] == [MICRO_BATCHES * planned] * STEPS
    for step, ops in enumerate(steps):
        # c10d.allreduce_: the counts, then the one after backward (clipping, the non-finite
        # check and the preemption flag used to take one each); DTensor issues none of its own.
        assert ops.get("allreduce_") == 2, (step, ops)
        assert "all_reduce" not in ops, (step, ops)
        # the loss takes the projection from its unit, unsharded: no all-gather of its own
        assert "all_gather_into_tensor" not in ops, (step, ops)
        # FSDP's own all-gathers and reduce-scatters: the same every step
        assert ops.get("_allgather_base_") == steps[0].get("_allgather_base_") > 0, (step, ops)
        assert ops.get("_reduce_scatter_base_") == steps[0].get("_reduce_scatter_base_") > 0, (step, ops)


def test_the_norm_and_the_clipping_equal_torch_clip_grad_norm() -> None:
    """One process, plain gradients: the squared-norm share (its sum over ranks is the global norm's
    square) and the clipping with that norm give what torch.nn.utils.clip_grad_norm_ gives; and
    a norm under the limit leaves the gradients bitwise as they were."""
    import math
    from types import SimpleNamespace

    import torch

    from fusiontrain.train.step import TrainStep, gradient_square_sum

    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(shape)) for shape in ((5, 3), (7,), (2, 2, 2))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs):
        a.grad = torch.randn_like(a)
        b.grad = a.grad.clone()
    norm = math.sqrt(gradient_square_sum(ours, 1, torch.device("cpu")).item())
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm=0.5)
    assert norm == pytest.approx(expected.item(), rel=1e-6) and norm > 0.5
    step = SimpleNamespace(settings=SimpleNamespace(max_grad_norm=0.5), device=torch.device("cpu"))
    TrainStep._clip_gradients(step, ours, norm)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
    before = [p.grad.clone() for p in ours]
    step.settings.max_grad_norm = 10.0
    TrainStep._clip_gradients(step, ours, norm)
    assert all(torch.equal(p.grad, g) for p, g in zip(ours, before))


def test_the_optimizer_is_fused_adamw_and_steps_like_single_tensor_adamw() -> None:
    """``build_optimizer`` gives fused AdamW on the CPU as on CUDA (HF's Trainer default since
    torch 2.8; about 3x faster than foreach here), over the trainable parameters only, decaying
    matrices and not vectors: five steps equal torch's single-tensor AdamW with the same groups."""
    import copy

    import torch

    from fusiontrain.config import OptimConfig
    from fusiontrain.train.optim import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    model[1].weight.requires_grad_(False)
    reference, initial = copy.deepcopy(model), copy.deepcopy(model)
    config = OptimConfig(lr=1e-2, weight_decay=0.1)
    optimizer = build_optimizer(model, config, torch.device("cpu"))
    assert all(group["fused"] and not group["foreach"] for group in optimizer.param_groups)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1, 0.0]
    assert sum(len(group["params"]) for group in optimizer.param_groups) == 5  # the frozen scale left out
    matrices = [p for p in reference.parameters() if p.requires_grad and p.dim() >= 2]
    vectors = [p for p in reference.parameters() if p.requires_grad and p.dim() < 2]
    single = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}],
        lr=1e-2, betas=config.betas, eps=config.eps, foreach=False,
    )  # fmt: skip
    for step in range(5):
        x = torch.randn(3, 8, generator=torch.Generator().manual_seed(step))
        for net, opt in ((model, optimizer), (reference, single)):
            opt.zero_grad(set_to_none=True)
            net(x).square().sum().backward()
            opt.step()
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert not torch.equal(model[0].weight, initial[0].weight) and torch.equal(model[1].weight, initial[1].weight)
