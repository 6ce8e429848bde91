"""Compile-ready LM step (issue 18): FlexAttention with soft-cap, window and relative positions; the chunked loss;
the compiled training loss equal to eager; zero graph breaks and recompiles across the model families (slow)."""
from __future__ import annotations

import copy

import pytest
import torch

from lm import CausalLM
from lm.modules.base import chunked_token_nll, token_nll
from zoo.models import attention as A
from zoo.models.transformer import Transformer, TransformerConfig

TOL = 1e-5
SMALL = dict(n_layers=2, d_model=32, d_ff=64, n_heads=2, n_kv_heads=1, head_dim=16, max_seq_len=64)
# One tiny config per family the compiled step must cover (registry name, overrides on top of SMALL).
FAMILIES = {
    "gemma2 (soft-caps + window)": ("gemma2-tiny", dict(window=8)),
    "gemma (plain causal)": ("gemma-tiny", {}),
    "chinchilla (relative positions)": ("gopher-tiny", dict(n_kv_heads=2)),
    "gemma2 routed (S-BASE)": ("gemma2-tiny", dict(window=8, ffn="routed", n_experts=3)),
}


def _randomised(model: Transformer) -> Transformer:
    # Non-trivial norm scales and relative-position biases, so every path changes the numbers.
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("cap,window,relative", [(5.0, None, False), (None, 6, False), (3.0, 6, True),
                                                 (None, None, True)])
def test_flex_equals_eager_with_softcap_window_gqa_and_relative_positions(cap, window, relative):
    torch.manual_seed(0)
    b, hq, hkv, t, hd = 2, 4, 2, 24, 16  # GQA: two query heads per kv head
    q, k, v = torch.randn(b, hq, t, hd), torch.randn(b, hkv, t, hd), torch.randn(b, hkv, t, hd)
    pos = torch.arange(t)
    per_distance = torch.randn(b, hq, t, min(window or t, t)) if relative else None
    bias = A.relative_position_logits(per_distance, None, pos[:, None] - pos[None, :]) if relative else None
    want = A.eager_attention(q, k, v, scale=0.25, mask=A.visible(pos, pos, window), cap=cap, bias=bias)
    got = A.flex_attention(q, k, v, scale=0.25, cap=cap, window=window, per_distance=per_distance)
    assert (got - want).abs().max().item() < TOL


def test_block_mask_is_built_once_per_shape_and_window():
    a = A.make_block_mask(40, 8, "cpu")
    assert A.make_block_mask(40, 8, "cpu") is a  # cached: not rebuilt per step or per layer
    assert A.make_block_mask(40, None, "cpu") is not a
    model = Transformer(TransformerConfig(**SMALL, vocab_size=50, window=8, layer_pattern=("local", "global")))
    model.prepare_block_masks(48)
    assert A.make_block_mask(48, 8, "cpu") is A.make_block_mask(48, 8, "cpu")
    assert (48, None, "cpu") in A._BLOCK_MASKS and (48, 8, "cpu") in A._BLOCK_MASKS


@pytest.mark.parametrize("cap", [None, 30.0])
def test_chunked_loss_equals_full_loss_and_gradients(cap):
    cfg = TransformerConfig(**SMALL, vocab_size=97, final_softcap=cap)
    model = _randomised(Transformer(cfg))
    ids = torch.randint(0, 97, (3, 21))  # 3*20 = 60 tokens: chunks of 16 leave a partial last chunk
    out = model(ids[:, :-1], return_aux=True)
    full = token_nll(out.logits, ids[:, 1:])
    full.mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    hidden_only = model(ids[:, :-1], return_aux=True, compute_logits=False)
    assert hidden_only.logits is None
    chunked = chunked_token_nll(model.logits, hidden_only.hidden, ids[:, 1:], 16)
    chunked.mean().backward()
    assert chunked.shape == full.shape and (chunked - full).abs().max().item() < TOL
    for n, p in model.named_parameters():
        assert (p.grad - want[n]).abs().max().item() < TOL, n


def test_chunked_loss_keeps_only_one_chunk_of_logits_for_backward():
    """Saved activations of the chunked loss hold no [N, V] logits: only the inputs each chunk recomputes from."""
    cfg = TransformerConfig(**SMALL, vocab_size=997)
    model = Transformer(cfg)
    hidden = torch.randn(4, 32, cfg.d_model, requires_grad=True)
    targets = torch.randint(0, 997, (4, 32))
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        chunked_token_nll(model.logits, hidden, targets, 16)
    assert max(saved) < 16 * 997 + 1  # the full loss would save 128 x 997 logits
    with pytest.raises(ValueError, match="chunk_size=0"):
        chunked_token_nll(model.logits, hidden, targets, 0)


def test_loss_chunk_size_is_validated_and_changes_no_number():
    with pytest.raises(ValueError, match="loss_chunk_size=-1"):
        CausalLM(model="gemma2-tiny", model_overrides=SMALL, loss_chunk_size=-1)
    torch.manual_seed(0)
    full = CausalLM(model="gemma2-tiny", model_overrides=dict(SMALL, window=8), total_steps=4)
    full.configure_model()
    chunked = CausalLM(model="gemma2-tiny", model_overrides=dict(SMALL, window=8), total_steps=4,
                       loss_chunk_size=7)
    chunked.configure_model()
    chunked.model.load_state_dict(full.model.state_dict())
    tokens = torch.randint(0, 259, (2, 17))
    (a, ma), (b, mb) = full.train_loss(tokens), chunked.train_loss(tokens)
    assert abs(a.item() - b.item()) < TOL and abs(ma["train/loss"].item() - mb["train/loss"].item()) < TOL


def _module(name: str, overrides: dict, **kw) -> CausalLM:
    torch.manual_seed(0)
    module = CausalLM(model=name, model_overrides={**SMALL, **overrides}, total_steps=10, warmup_steps=1, **kw)
    module.configure_model()
    _randomised(module.model)
    return module


def _steps(module: CausalLM, batches: list[torch.Tensor]) -> list[float]:
    opt = module.configure_optimizers()["optimizer"]
    losses = []
    for tokens in batches:
        total, metrics = module.compiled_train_loss(tokens)
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(metrics["train/loss"])
    return [float(x) for x in losses]


def _max_abs_diff(a: CausalLM, b: CausalLM) -> tuple[float, str]:
    worst = max(((p.double() - q.double()).abs().max().item(), n)
                for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()))
    return worst


@pytest.mark.filterwarnings("ignore")
def test_compiled_training_loss_equals_eager_over_two_steps():
    """compile=True (forward, chunked loss and backward as one fullgraph graph) trains to the same numbers.

    "The same" is judged against a float64 run of the same steps, not by a fixed tolerance: the compiled graph sums
    in another order than eager, and AdamW divides each gradient by its own running magnitude, so a weight whose
    gradient is at fp32 rounding level can move by up to ~lr under either order (1.1e-5 was measured on one CPU, 1e-9
    on another). The compiled run must be as close to float64 as the eager fp32 run is, within a factor that
    allows for a different summation order (x8) plus a floor of a few fp32 ulps of the weights' scale.
    """
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 259, (2, 17), generator=g) for _ in range(2)]
    eager = _module("gemma2-tiny", dict(window=8), loss_chunk_size=12)
    compiled, exact = copy.deepcopy(eager), copy.deepcopy(eager)
    compiled.hparams.compile = True
    exact.model.double()
    want, got, truth = _steps(eager, batches), _steps(compiled, batches), _steps(exact, batches)
    assert compiled._compiled_train_loss is not None
    floor = 8 * torch.finfo(torch.float32).eps * max(p.abs().max().item() for p in exact.model.parameters())
    eager_err, _ = _max_abs_diff(eager, exact)
    compiled_err, worst = _max_abs_diff(compiled, exact)
    assert compiled_err <= 8 * eager_err + floor, (
        f"compiled weights are {compiled_err:.3g} from float64 ({worst}); eager fp32 is {eager_err:.3g} from it")
    loss_eager_err = max(abs(a - t) for a, t in zip(want, truth))
    loss_compiled_err = max(abs(b - t) for b, t in zip(got, truth))
    loss_floor = 8 * torch.finfo(torch.float32).eps * max(abs(t) for t in truth)
    assert loss_compiled_err <= 8 * loss_eager_err + loss_floor, (
        f"losses: compiled {got} eager {want} float64 {truth}")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_loss_compiles_without_graph_breaks_or_recompiles(family):
    name, overrides = FAMILIES[family]
    module = _module(name, overrides, loss_chunk_size=12)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 259, (2, 17), generator=g) for _ in range(5)]
    torch._dynamo.reset()
    explained = torch._dynamo.explain(module.train_loss)(batches[0])
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    step = torch.compile(module.train_loss, backend=counter, fullgraph=True)
    opt = module.configure_optimizers()["optimizer"]
    for tokens in batches:  # five steps with new tokens and updated weights: one graph, compiled once
        total, _ = step(tokens)
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert counter.frame_count == 1


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_compiled_flex_forward_reads_cached_masks_without_breaks():
    """The GPU path (flex inside the compiled graph, soft-cap + window, relative positions) traced on CPU: forward
    only, since PyTorch's flex has no CPU backward; masks prepared once and read as constants."""
    for name, overrides in (FAMILIES["gemma2 (soft-caps + window)"], FAMILIES["chinchilla (relative positions)"]):
        module = _module(name, {**overrides, "attn_backend": "flex"})
        ref = copy.deepcopy(module.model).eval()
        ref.config.attn_backend = "eager"
        model = module.model.eval()
        model.prepare_block_masks(16)
        ids = torch.randint(0, 259, (2, 16))
        torch._dynamo.reset()
        with torch.no_grad():
            explained = torch._dynamo.explain(model)(ids)
            assert explained.graph_break_count == 0, explained.break_reasons
            got = torch.compile(model, fullgraph=True, backend="aot_eager")(ids)
            assert (got - ref(ids)).abs().max().item() < TOL


def test_chunking_and_compile_are_refused_where_the_step_does_not_use_them():
    from lm import Distill

    with pytest.raises(ValueError, match="loss_chunk_size=8 has no effect"):
        Distill(student="gemma2-tiny", student_overrides=SMALL, loss_chunk_size=8)
