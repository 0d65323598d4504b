"""torch.compile of the blocks ``parallel.compile`` compiles, against the same blocks run eagerly.

The graph capture is checked with the ``aot_eager`` backend (dynamo + AOTAutograd, forward and
backward graphs, without inductor's code generation: compiling a block with inductor on the CPU
takes tens of seconds; ``benchmarks/compile_cpu.py`` measures inductor). Compile through the
Trainer, with FSDP2 and activation checkpointing, is ``tests/test_train.py::test_compiled_step_equals_eager``.
"""

from __future__ import annotations

import torch
import torch._dynamo

from fusiontrain.families.llama import LlamaDecoderArgs, llama_cross_attention_layer, llama_self_attention_layer
from fusiontrain.modules import FusionLayer
from fusiontrain.modules.packed import cross_attention_layout, self_attention_layout

ARGS = LlamaDecoderArgs(
    vocab_size=16, hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=2, head_dim=8,
    rms_norm_eps=1e-5, rope_theta=10_000.0, rope_scaling=None, max_seq_len=64,
)  # fmt: skip
B, S, S_E = 2, 48, 20  # rows, tokens per row, encoder tokens per row


class CountingAotEager:
    """The ``aot_eager`` backend, counting the graphs dynamo hands it."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        self.graphs += 1
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


def fusion_layer() -> torch.nn.Module:
    """A fusion layer as in fusion-only training: a trainable cross-attention layer with open gates,
    then a frozen self-attention layer (Llama 3.2 Vision's order). It holds both decoder block kinds."""
    torch.manual_seed(0)
    cross = llama_cross_attention_layer(ARGS)
    with torch.no_grad():  # gates shut at init would hide the cross-attention
        cross.ca_scale.scale.fill_(0.6)
        cross.mlp_scale.scale.fill_(-0.3)
    return FusionLayer(llama_self_attention_layer(ARGS).requires_grad_(False), cross)


def packed_inputs(lengths: list[list[int]], image_spans: list[tuple[int, int, int, int, int]]) -> dict:
    """Block keyword arguments for packed rows: segments of ``lengths`` per row, and encoder
    spans ``(row, first token, end token, first encoder token, end encoder token)``."""
    ids = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths])
    positions = torch.cat([torch.arange(n) for row in lengths for n in row]).view(B, S)
    encoder_mask = torch.zeros(B, S, S_E, dtype=torch.bool)
    for row, start, end, first, last in image_spans:
        encoder_mask[row, start:end, first:last] = True
    return {
        "mask": self_attention_layout(ids),
        "encoder_mask": cross_attention_layout(encoder_mask),
        "input_pos": positions,
    }


# Three packed micro-batches of the same [b, s]: other segments, other tokens that see an image.
LAYOUTS = [
    packed_inputs([[10, 30, 8], [48]], [(0, 0, 10, 0, 10), (0, 12, 40, 10, 20), (1, 3, 30, 0, 20)]),
    packed_inputs([[5, 5, 20, 18], [40, 8]], [(0, 2, 5, 0, 7), (1, 0, 44, 0, 20)]),
    packed_inputs([[48], [1, 2, 45]], [(0, 0, 33, 0, 20), (1, 4, 9, 0, 4), (1, 10, 48, 4, 20)]),
]


def forward_backward(block: torch.nn.Module, run, x: torch.Tensor, encoder: torch.Tensor, kwargs: dict) -> list[torch.Tensor]:
    """Output, then the gradients of x, the encoder embeddings and the block's trainable parameters."""
    x, encoder = x.clone().requires_grad_(), encoder.clone().requires_grad_()
    out = run(x, encoder_input=encoder, **kwargs)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    wrt = [x, encoder, *(p for p in block.parameters() if p.requires_grad)]
    return [out.detach(), *torch.autograd.grad((out * weights).sum(), wrt)]


def test_compiled_fusion_layer_equals_eager_on_packed_rows_and_stops_recompiling() -> None:
    """Outputs and gradients match eager on three packed layouts of the same [b, s]. The packed
    attention is a graph break (opaque to dynamo), so a new layout does not recompile through its
    group structure; the count of tokens that see an image varies, which recompiles once (to a
    dynamic size), not per micro-batch."""
    block = fusion_layer()
    torch.manual_seed(1)
    xs = [torch.randn(B, S, ARGS.hidden_size) for _ in LAYOUTS]
    encoders = [torch.randn(B, S_E, ARGS.hidden_size) for _ in LAYOUTS]
    torch._dynamo.reset()
    try:
        backend = CountingAotEager()
        compiled = torch.compile(block, backend=backend)
        graphs_after = []
        for x, encoder, kwargs in zip(xs, encoders, LAYOUTS):
            got = forward_backward(block, compiled, x, encoder, kwargs)
            want = forward_backward(block, block, x, encoder, kwargs)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
            graphs_after.append(backend.graphs)
    finally:
        torch._dynamo.reset()
    assert graphs_after[0] > 0, "nothing was compiled"
    assert graphs_after[2] == graphs_after[1], f"recompiled on the third layout: graphs after each {graphs_after}"
