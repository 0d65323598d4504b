"""fusiontrain.train.loss: the chunked cross-entropy over the gathered target positions against a plain
full-logits cross-entropy over every position, the target index a Batch carries, and the memory
the loss saves for backward (counted with saved-tensor hooks, no timing)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusiontrain.data import Batch
from fusiontrain.data.batch import target_positions
from fusiontrain.torch_private import TorchDispatchMode
from fusiontrain.train.loss import chunked_cross_entropy_sum, count_targets, full_cross_entropy_sum, loss_chunk_rows

B, S, D, V = 2, 10, 16, 50  # S = 10 is divisible by neither 3 nor 4


def _inputs(dtype: torch.dtype, seed: int = 0, ignore_all: bool = False):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, D, generator=generator).to(dtype)
    output = nn.Linear(D, V, bias=False)
    with torch.no_grad():
        output.weight.copy_(torch.randn(V, D, generator=generator) / D**0.5)
    output = output.to(dtype)
    labels = torch.randint(0, V, (B, S), generator=generator)
    labels[0, :3] = -100  # prompt
    labels[1, -4:] = -100  # padding
    labels[1, 5] = -100
    if ignore_all:
        labels.fill_(-100)
    return hidden, labels, output


def _reference(hidden: torch.Tensor, labels: torch.Tensor, output: nn.Module):
    """The plain computation: full logits, fp32 cross-entropy, summed."""
    hidden = hidden.detach().clone().requires_grad_(True)
    output.zero_grad(set_to_none=True)
    loss = F.cross_entropy(
        output(hidden).float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
    )
    loss.backward()
    return loss.detach(), hidden.grad, output.weight.grad.clone()


def _chunked(hidden: torch.Tensor, labels: torch.Tensor, output: nn.Module, k: int):
    hidden = hidden.detach().clone().requires_grad_(True)
    output.zero_grad(set_to_none=True)
    loss = chunked_cross_entropy_sum(hidden, labels, output, num_chunks=k)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    loss.backward()
    return loss.detach(), hidden.grad, output.weight.grad.clone()


def _by_hand(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> float:
    """Token by token in float64, independent of F.cross_entropy."""
    total = 0.0
    h, w = hidden.double(), weight.double()
    for b in range(B):
        for s in range(S):
            if labels[b, s] == -100:
                continue
            logits = w @ h[b, s]
            total += (torch.logsumexp(logits, 0) - logits[labels[b, s]]).item()
    return total


@pytest.mark.parametrize("k", [0, 1, 3, 4])
def test_matches_full_cross_entropy_fp32(k: int) -> None:
    hidden, labels, output = _inputs(torch.float32)
    want_loss, want_h, want_w = _reference(hidden, labels, output)
    got_loss, got_h, got_w = _chunked(hidden, labels, output, k)
    assert want_loss.item() == pytest.approx(_by_hand(hidden, labels, output.weight.detach()), rel=1e-5)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
    # ignored positions get no gradient
    ignored = labels == -100
    assert torch.all(got_h[ignored] == 0) and torch.all(got_h[~ignored].abs().sum(-1) > 0)


@pytest.mark.parametrize("k", [0, 1, 3, 4])
def test_matches_full_cross_entropy_bf16(k: int) -> None:
    hidden, labels, output = _inputs(torch.bfloat16)
    want_loss, want_h, want_w = _reference(hidden, labels, output)
    got_loss, got_h, got_w = _chunked(hidden, labels, output, k)
    assert got_h.dtype == got_w.dtype == torch.bfloat16
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got_h.float(), want_h.float(), rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(got_w.float(), want_w.float(), rtol=2e-2, atol=2e-3)
    exact = _by_hand(hidden, labels, output.weight.detach())
    assert got_loss.item() == pytest.approx(exact, rel=2e-2)


@pytest.mark.parametrize("k", [0, 1, 3, 4])
def test_all_labels_ignored_gives_zero(k: int) -> None:
    hidden, labels, output = _inputs(torch.float32, ignore_all=True)
    loss, grad_h, grad_w = _chunked(hidden, labels, output, k)
    assert loss.item() == 0.0
    assert torch.all(grad_h == 0) and torch.all(grad_w == 0)
    assert not torch.isnan(grad_h).any() and not torch.isnan(grad_w).any()


def test_custom_ignore_index() -> None:
    hidden, labels, output = _inputs(torch.float32)
    labels = torch.where(labels == -100, torch.full_like(labels, 7), labels)
    labels[0, 0] = 3
    want = F.cross_entropy(output(hidden).flatten(0, 1), labels.flatten(), ignore_index=7, reduction="sum")
    got = chunked_cross_entropy_sum(hidden, labels, output, num_chunks=3, ignore_index=7)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    assert count_targets(labels, ignore_index=7).item() == sum(int(x) != 7 for x in labels.flatten())


def test_count_targets() -> None:
    _, labels, _ = _inputs(torch.float32)
    expected = sum(1 for row in labels.tolist() for x in row if x != -100)
    assert expected == B * S - 8
    counted = count_targets(labels)
    assert counted.dim() == 0 and counted.dtype == torch.int64 and counted.item() == expected
    assert count_targets(torch.full((3, 4), -100)).item() == 0


def test_the_loss_of_a_sum_does_not_depend_on_the_split() -> None:
    """Sum over rows == loss of the batch (what lets the trainer divide by global targets)."""
    hidden, labels, output = _inputs(torch.float32)
    whole = chunked_cross_entropy_sum(hidden, labels, output, num_chunks=4)
    parts = sum(chunked_cross_entropy_sum(hidden[i : i + 1], labels[i : i + 1], output, num_chunks=4) for i in range(B))
    torch.testing.assert_close(whole, parts, rtol=1e-6, atol=1e-5)


# -- memory ---------------------------------------------------------------------------------------


def _saved_for_backward(fn, leaves: list[torch.Tensor]) -> list[tuple[tuple[int, ...], int]]:
    """(shape, bytes) of every tensor that autograd keeps for backward while ``fn()`` builds its
    graph, except the leaves themselves (or views of them), which exist anyway."""
    leaf_storages = {leaf.untyped_storage().data_ptr() for leaf in leaves}
    saved: list[tuple[tuple[int, ...], int]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() not in leaf_storages:
            saved.append((tuple(tensor.shape), tensor.numel() * tensor.element_size()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = fn()
    loss.backward()  # the graph is complete and usable
    return saved


def test_chunked_loss_never_saves_the_full_logits() -> None:
    b, s, d, v, k = 2, 256, 64, 32000, 8
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(b, s, d, generator=generator, requires_grad=True)
    output = nn.Linear(d, v, bias=False)
    labels = torch.randint(0, v, (b, s), generator=generator)
    labels[:, :16] = -100
    leaves = [hidden, output.weight]
    n = b * (s - 16)  # target positions
    chunk_logits_bytes = -(-n // k) * v * 4

    # the measurement sees the full fp32 logits of every position in the reference...
    reference = _saved_for_backward(lambda: full_cross_entropy_sum(hidden, labels, output), leaves)
    assert any(shape == (b * s, v) for shape, _ in reference)
    # ...and those of the targets only when the gathered loss is not chunked
    unchunked = _saved_for_backward(lambda: chunked_cross_entropy_sum(hidden, labels, output, num_chunks=0), leaves)
    assert max(nbytes for _, nbytes in unchunked) == n * v * 4
    assert any(shape == (n, v) for shape, _ in unchunked)

    chunked = _saved_for_backward(lambda: chunked_cross_entropy_sum(hidden, labels, output, num_chunks=k), leaves)
    largest = max((nbytes for _, nbytes in chunked), default=0)
    total = sum(nbytes for _, nbytes in chunked)
    assert all(shape[-1:] != (v,) or nbytes <= chunk_logits_bytes for shape, nbytes in chunked)
    assert largest <= chunk_logits_bytes, chunked
    assert total < 2 * chunk_logits_bytes, f"{total} bytes saved over {len(chunked)} tensors"
    # and the grads are those of the plain loss
    hidden.grad = None
    output.zero_grad(set_to_none=True)
    chunked_cross_entropy_sum(hidden, labels, output, num_chunks=k).backward()
    grad_h, grad_w = hidden.grad.clone(), output.weight.grad.clone()
    hidden.grad = None
    output.zero_grad(set_to_none=True)
    F.cross_entropy(output(hidden).flatten(0, 1), labels.flatten(), reduction="sum").backward()
    torch.testing.assert_close(grad_h, hidden.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_w, output.weight.grad, rtol=1e-4, atol=1e-5)


# -- a frozen output projection (fusion-only training) ------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [2, 3, 4, 7])
def test_frozen_projection_matches_full_cross_entropy(dtype: torch.dtype, k: int) -> None:
    """With a frozen projection the hidden states' gradient is taken in forward, chunk by chunk:
    the same loss and gradient as the plain computation, and no weight gradient."""
    hidden, labels, output = _inputs(dtype)
    want_loss, want_h, _ = _reference(hidden, labels, output)
    output.weight.grad = None
    output.weight.requires_grad_(False)
    leaf = hidden.detach().clone().requires_grad_(True)
    loss = chunked_cross_entropy_sum(leaf, labels, output, num_chunks=k)
    assert loss.dtype == torch.float32 and loss.grad_fn is not None
    (loss * 2.0).backward()  # backward scales the stored gradient by the incoming one
    assert output.weight.grad is None and leaf.grad.dtype == dtype
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 4e-3}
    torch.testing.assert_close(loss, want_loss, **({"rtol": 1e-6, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-3, "atol": 1e-3}))
    torch.testing.assert_close(leaf.grad.float(), 2.0 * want_h.float(), **tolerance)
    assert torch.all(leaf.grad[labels == -100] == 0)


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
def test_an_index_holding_ignored_positions_counts_only_the_targets(frozen: bool) -> None:
    """A target index may be a superset of the targets (here every position): its ignored rows
    add no loss and get no gradient, in every chunk."""
    hidden, labels, output = _inputs(torch.float32, seed=2)
    want_loss, want_h, _ = _reference(hidden, labels, output)
    output.weight.grad = None
    output.weight.requires_grad_(not frozen)
    leaf = hidden.detach().clone().requires_grad_(True)
    every_position = torch.arange(B * S)
    loss = chunked_cross_entropy_sum(leaf, labels, output, num_chunks=3, target_index=every_position)
    loss.backward()
    torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(leaf.grad, want_h, rtol=1e-5, atol=1e-6)
    assert torch.all(leaf.grad[labels == -100] == 0) and torch.all(leaf.grad[labels != -100] != 0)


def test_frozen_projection_all_ignored_and_no_grad() -> None:
    hidden, labels, output = _inputs(torch.float32, ignore_all=True)
    output.weight.requires_grad_(False)
    leaf = hidden.clone().requires_grad_(True)
    loss = chunked_cross_entropy_sum(leaf, labels, output, num_chunks=3)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(leaf.grad == 0)
    with torch.no_grad():  # eval: no gradient is computed or kept
        assert chunked_cross_entropy_sum(hidden, labels, output, num_chunks=3).item() == 0.0


def test_frozen_projection_keeps_only_the_hidden_gradient() -> None:
    """What autograd keeps: one tensor the size of the gathered target rows ``[n, d]``, never
    logits, nor anything of the size of the hidden states ``[b * s, d]``; and nothing is recomputed
    in backward (the projection runs k times in all, plus k input-gradient matmuls)."""
    b, s, d, v, k = 2, 256, 64, 32000, 8
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(b, s, d, generator=generator, requires_grad=True)
    output = nn.Linear(d, v, bias=False).requires_grad_(False)
    labels = torch.randint(0, v, (b, s), generator=generator)
    labels[0, 40:100] = -100
    labels[1, :30] = -100
    index = target_positions(labels)
    n = b * s - 90
    assert index.shape == (n,)
    saved = _saved_for_backward(
        lambda: chunked_cross_entropy_sum(hidden, labels, output, num_chunks=k, target_index=index), [hidden, index]
    )
    assert saved == [((n, d), n * d * 4)]


# -- the gather of the target positions -----------------------------------------------------------


def _sparse_labels(b: int, s: int, v: int, generator: torch.Generator) -> torch.Tensor:
    """Targets with ignored positions at the start, in the middle and at the end of rows, and one
    row with no target at all."""
    labels = torch.randint(0, v, (b, s), generator=generator)
    labels[0, :2] = -100
    labels[0, 4:7] = -100
    labels[1, :] = -100
    labels[2, 3] = -100
    labels[2, -2:] = -100
    return labels


@pytest.mark.parametrize("k", [0, 3])
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
@pytest.mark.parametrize("ignore_all", [False, True], ids=["sparse", "all_ignored"])
def test_gathered_loss_matches_full_projection(k: int, frozen: bool, ignore_all: bool) -> None:
    """Loss and gradients (hidden states; weight when it trains) over the gathered targets, with
    the index computed on the host, equal the reference that projects every position."""
    b, s, d, v = 3, 11, 16, 40
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(b, s, d, generator=generator)
    output = nn.Linear(d, v, bias=False)
    with torch.no_grad():
        output.weight.copy_(torch.randn(v, d, generator=generator) / d**0.5)
    output.requires_grad_(not frozen)
    labels = _sparse_labels(b, s, v, generator)
    if ignore_all:
        labels.fill_(-100)
    index = target_positions(labels)
    assert index.tolist() == [i for i, label in enumerate(labels.flatten().tolist()) if label != -100]

    def run(loss_fn):
        leaf = hidden.clone().requires_grad_(True)
        output.zero_grad(set_to_none=True)
        loss = loss_fn(leaf)
        loss.backward()
        return loss.detach(), leaf.grad, None if frozen else output.weight.grad.clone()

    want_loss, want_h, want_w = run(lambda h: full_cross_entropy_sum(h, labels, output))
    got_loss, got_h, got_w = run(
        lambda h: chunked_cross_entropy_sum(h, labels, output, num_chunks=k, target_index=index)
    )
    assert want_loss.item() == pytest.approx(0.0 if ignore_all else _by_hand_rows(hidden, labels, output.weight), rel=1e-5)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=1e-6)
    if not frozen:
        torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
    assert torch.all(got_h[labels == -100] == 0) and torch.all(got_h[labels != -100].abs().sum(-1) > 0)


def _by_hand_rows(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> float:
    """Token by token in float64 over every position of ``labels`` ``[b, s]`` that is a target."""
    h, w = hidden.double(), weight.detach().double()
    total = 0.0
    for (row, col), label in zip(torch.cartesian_prod(*map(torch.arange, labels.shape)).tolist(), labels.flatten().tolist()):
        if label != -100:
            logits = w @ h[row, col]
            total += (torch.logsumexp(logits, 0) - logits[label]).item()
    return total


def test_batch_carries_the_target_index() -> None:
    """``with_target_index`` takes the target positions from the host labels; ``to`` and ``map``
    carry the index; labels that are not on the host are refused with a message."""
    b, s = 3, 8
    labels = _sparse_labels(b, s, 40, torch.Generator().manual_seed(2))
    batch = Batch(
        tokens=torch.zeros(b, s, dtype=torch.long),
        labels=labels,
        input_pos=torch.arange(s).expand(b, s).clone(),
        is_real=torch.ones(b, s, dtype=torch.bool),
    )
    assert batch.target_index is None
    indexed = batch.with_target_index(-100)
    want = [row * s + col for row in range(b) for col in range(s) if labels[row, col] != -100]
    assert indexed.target_index.dtype == torch.int64 and indexed.target_index.tolist() == want
    other = int(labels[0, 2])  # another ignore index: the -100 positions become targets
    assert indexed.with_target_index(other).target_index.tolist() == [i for i, x in enumerate(labels.flatten()) if x != other]
    moved = indexed.to("cpu")
    assert moved.target_index.tolist() == want
    mapped = indexed.map(lambda t: t + 0)
    assert mapped.target_index is not indexed.target_index and mapped.target_index.tolist() == want
    assert indexed.map(lambda t: t.to("meta")).target_index.device.type == "meta"
    with pytest.raises(ValueError, match="with_target_index"):
        batch.map(lambda t: t.to("meta")).with_target_index(-100)
    meta = torch.empty(b, s, 4, device="meta")
    with pytest.raises(ValueError, match="pass target_index"):  # the loss cannot count them either
        chunked_cross_entropy_sum(meta, labels.to("meta"), nn.Linear(4, 40, device="meta"), num_chunks=2)


class _ProjectionRows(TorchDispatchMode):
    """Records the rows of every matmul whose output has ``V`` columns (the output projection)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - the dispatch protocol
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm.default) and out.shape[-1] == V:
            self.rows.append(out.shape[0])
        return out


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen projection", "trainable projection"])
def test_chunks_of_bounded_rows_give_the_same_loss_and_fewer_larger_projections(trainable: bool) -> None:
    """``chunk_rows`` (the trainer's: what ``k`` chunks give a micro-batch whose every slot is a
    target) projects the n < b * s targets in ceil(n / rows) chunks of at most that many rows,
    not in k smaller ones; loss and gradients equal the full-logits reference."""
    hidden, labels, output = _inputs(torch.float32, seed=4)
    ref_loss, ref_grad, ref_weight_grad = _reference(hidden, labels, output)
    output.zero_grad(set_to_none=True)
    output.weight.requires_grad_(trainable)
    k = 4
    rows = loss_chunk_rows(B * S, k)
    n = int((labels != -100).sum())
    assert (rows, n) == (5, 12)  # k chunks of the worst case (20 targets) are 5 rows; this batch has 12
    leaf = hidden.detach().clone().requires_grad_(True)
    with _ProjectionRows() as forward:
        loss = chunked_cross_entropy_sum(leaf, labels, output, num_chunks=k, chunk_rows=rows)
    assert forward.rows == [5, 5, 2]  # ceil(12 / 5) = 3 chunks, not k = 4 chunks of 3
    with _ProjectionRows() as backward:
        loss.backward()
    assert all(r <= rows for r in backward.rows)  # a trainable projection recomputes its chunks
    torch.testing.assert_close(loss.detach(), ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(leaf.grad, ref_grad, atol=1e-5, rtol=1e-5)
    if trainable:
        output.zero_grad(set_to_none=True)
        again = hidden.detach().clone().requires_grad_(True)
        chunked_cross_entropy_sum(again, labels, output, num_chunks=k, chunk_rows=rows).backward()
        torch.testing.assert_close(output.weight.grad, ref_weight_grad, atol=1e-5, rtol=1e-5)
    assert loss_chunk_rows(B * S, 1) is None and loss_chunk_rows(B * S, 0) is None
