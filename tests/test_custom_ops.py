"""The fused ops as PyTorch custom ops: their fake (shape-only) implementations and autograd registrations
hold (`torch.library.opcheck`), and torch.compile traces a whole distillation step around them in one graph.

On the CPU the kernels run in Triton's interpreter: slow, so the shapes are small and the compiled step uses
the `aot_eager` backend, which runs everything torch.compile does with custom ops (dynamo's trace with fake
tensors, the joint forward-backward graph of AOTAutograd) but generates no code of its own.
"""
import dataclasses

import pytest
import torch

from dpal import decoder as dpal_decoder, losses
from dpal.decoder import DynamicPatternDecoder
from dpal.distill import distill_step_losses
from dpal.losses import quantize_relation, relation_matrix
from dpal.recipes import get_recipe
from dpal.students import build_student
from kernels import decoder_experts, relation_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _randn(generator, *shape, dtype=torch.float32, scale=1.0, requires_grad=False):
    t = (torch.randn(*shape, generator=generator) * scale).to(DEVICE, dtype)
    return t.requires_grad_(requires_grad)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["fp32-weight", "bf16-weight"])
def test_expert_ops_pass_opcheck(weight_dtype):
    g = torch.Generator().manual_seed(0)
    batch, patterns, dim, out_dim = 2, 3, 8, 4
    features = dim * out_dim
    queries = _randn(g, batch, patterns, dim, dtype=torch.bfloat16, requires_grad=True)
    scores = torch.rand(batch, patterns, generator=g).softmax(-1).to(DEVICE).requires_grad_()
    weight = _randn(g, features, dim, dtype=weight_dtype, scale=dim ** -0.5, requires_grad=True)
    vectors = [_randn(g, features, scale=0.1, requires_grad=True) for _ in range(3)]
    torch.library.opcheck(decoder_experts.expert_mix, (queries, scores, weight, *vectors, 256.0, 0.025, 1e-6))
    h = _randn(g, batch, 3, dim, requires_grad=True)
    mixed = _randn(g, batch, dim, out_dim, requires_grad=True)
    norm = [_randn(g, out_dim, requires_grad=True) for _ in range(2)]
    torch.library.opcheck(decoder_experts.output_projection, (h, mixed, *norm, 1e-6))
    # One token against a wider W_b: backward uses the z forward kept instead of recomputing it.
    wide = 2 * dim
    assert decoder_experts.keeps_output(1, wide) and not decoder_experts.keeps_output(3, dim)
    torch.library.opcheck(decoder_experts.output_projection, (
        _randn(g, batch, 1, wide, requires_grad=True), _randn(g, batch, wide, out_dim, requires_grad=True),
        *norm, 1e-6))


@pytest.mark.parametrize("fmt", ["float32", "int8"])
def test_relation_op_passes_opcheck(fmt):
    g = torch.Generator().manual_seed(1)
    y = _randn(g, 2, 5, 8, requires_grad=True)
    probs = relation_matrix(torch.randn(2, 5, 8, generator=g))
    target, scale = quantize_relation(probs) if fmt == "int8" else (probs, None)
    torch.library.opcheck(relation_loss.relation_kl_forward,
                          (y, target.to(DEVICE), None if scale is None else scale.to(DEVICE)))


@pytest.mark.e2e
def test_whole_distillation_step_compiles_around_the_fused_ops(monkeypatch):
    # The ViT-Ti recipe with a narrow decoder (the interpreter's time grows with D * D_o); fused ops on the
    # device the kernels run on here, as `kernels.register()` makes them on CUDA.
    recipe = get_recipe("path-b_vit-ti")
    recipe = dataclasses.replace(recipe, decoder=dataclasses.replace(recipe.decoder, in_dim=48, out_dim=24))
    for op, fused in ((dpal_decoder.expert_path, decoder_experts.expert_path),
                      (losses.relation_kl, relation_loss.relation_kl)):
        monkeypatch.setattr(op, "implementations", {torch.device(DEVICE).type: fused})
    torch.manual_seed(0)
    student, decoder = build_student(recipe).to(DEVICE), DynamicPatternDecoder(recipe.decoder).to(DEVICE)
    with torch.no_grad():
        decoder.pattern_queries.normal_()  # zero init would make the three experts equal
    g, teacher = torch.Generator().manual_seed(2), recipe.teacher
    tokens = (256 // teacher.token_stride) * (128 // teacher.token_stride)
    crowd_tokens = (256 // teacher.token_stride) ** 2 + int(teacher.has_cls)
    arguments = dict(global_view=_randn(g, 1, 3, 256, 128), local_views=_randn(g, 1, 1, 3, 128, 96),
                     crowd_view=_randn(g, 1, 3, 256, 256), global_target=_randn(g, 1, 24),
                     local_target=_randn(g, 1, tokens, 24), local_mask=torch.rand(1, tokens, generator=g).to(DEVICE),
                     relation_target=relation_matrix(torch.randn(1, crowd_tokens, 8, generator=g)).to(DEVICE),
                     moe_loss_weight=0.1)
    params = [*student.parameters(), *decoder.parameters()]
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append({str(node.target) for node in graph_module.graph.nodes if node.op == "call_function"})
        from torch._dynamo.backends.debugging import aot_eager
        return aot_eager(graph_module, example_inputs)

    def step(losses_of):
        for p in params:
            p.grad = None
        terms = losses_of(student, decoder, teacher, **arguments)
        terms.total.backward()
        return {k: v.detach() for k, v in terms.by_name().items()}, [p.grad.clone() for p in params]

    eager_terms, eager_grads = step(distill_step_losses)
    compiled_terms, compiled_grads = step(torch.compile(distill_step_losses, fullgraph=True,
                                                        backend=recording_backend))
    assert len(graphs) == 1
    assert {"dpal_fused.expert_mix.default", "dpal_fused.output_projection.default",
            "dpal_fused.relation_kl_forward.default", "dpal.bicubic_axis_matrix.default"} <= graphs[0]
    assert eager_terms.keys() == compiled_terms.keys()
    for key in eager_terms:
        torch.testing.assert_close(compiled_terms[key], eager_terms[key], rtol=1e-5, atol=1e-7, msg=key)
    for eager, compiled in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)
