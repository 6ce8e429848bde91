"""Routed FFN: Sinkhorn balancing, hash determinism, REINFORCE sign, routers' shapes and stats, training on CPU."""
from __future__ import annotations

import math
import pytest
import torch

from zoo.models.transformer import TransformerConfig
from lm.modules.routing import reinforce_loss
from zoo.models.routing import (RoutedFFN, balance_loss, expert_bias, hash_table, load_fractions, routed_layers,
                                routing_stats, sinkhorn)


def cfg(router: str, n_experts: int = 4, **kw) -> TransformerConfig:
    c = TransformerConfig(vocab_size=50, d_model=16, d_ff=24, n_heads=2, n_layers=2, ffn="routed",
                          n_experts=max(n_experts, 1), router=router if router != "bogus" else "sbase")
    c.router, c.n_experts = router, n_experts  # bypass the config's own checks to reach RoutedFFN's
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def test_sinkhorn_marginals_balanced():
    torch.manual_seed(0)
    # Skewed logits: without balancing, most tokens would pick expert 0.
    logits = torch.randn(512, 8) + torch.tensor([3.0, 0, 0, 0, 0, 0, 0, 0])
    plan = sinkhorn(logits, n_iters=20)
    assert torch.allclose(plan.sum(1), torch.full((512,), 1 / 512), rtol=1e-4)
    assert torch.allclose(plan.sum(0), torch.full((8,), 1 / 8), rtol=2e-2)
    unbalanced = load_fractions(logits.argmax(-1), 8)
    balanced = load_fractions(plan.argmax(-1), 8)
    assert unbalanced.max() > 0.5
    assert (balanced - 1 / 8).abs().max() < 0.05


def test_expert_bias_reproduces_balanced_argmax_and_balances_eval():
    torch.manual_seed(0)
    skew = torch.tensor([3.0, 0, 0, 0])
    logits = torch.randn(256, 4) + skew
    plan = sinkhorn(logits, n_iters=20)
    assert torch.equal(plan.argmax(-1), (logits + expert_bias(plan, logits)).argmax(-1))
    # A router that prefers expert 0: training balances with Sinkhorn, eval (token by token) reuses the bias.
    layer = RoutedFFN(cfg("sbase"))
    with torch.no_grad():
        layer.router.weight.normal_()
        layer.router.weight[0, 0] = 8.0
    x, ids = torch.randn(8, 64, 16), torch.zeros(8, 64, dtype=torch.long)
    x[..., 0] = x[..., 0].abs()  # positive feature 0 -> expert 0's logit is largest for every token
    layer.eval()
    assert layer(x, ids)[1].stats["load"][0] > 0.6  # before any training: plain greedy, mostly expert 0
    layer.train()
    for _ in range(200):
        layer(x, ids)
    layer.eval()
    layer(x[:1, :1], ids[:1, :1])  # one token alone: no batch to balance against
    assert layer(x, ids)[1].stats["load"].max() < 0.4  # near 1/4 each, as in training


def test_sinkhorn_keeps_preferences_and_survives_huge_logits():
    logits = torch.tensor([[100.0, 0.0], [0.0, 100.0], [90.0, 0.0], [0.0, 90.0]])
    plan = sinkhorn(logits)
    assert torch.isfinite(plan).all()
    assert plan.argmax(-1).tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="tokens, experts"):
        sinkhorn(torch.zeros(3))


def test_hash_deterministic_balanced_and_parameter_free():
    a, b, c = hash_table(1000, 8, seed=3), hash_table(1000, 8, seed=3), hash_table(1000, 8, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.bincount(a, minlength=8).tolist() == [125] * 8
    layer = RoutedFFN(cfg("hash"))
    assert "token_to_expert" in dict(layer.named_buffers())
    assert not any("router" in n for n, _ in layer.named_parameters())
    ids = torch.randint(0, 50, (2, 7))
    x = torch.randn(2, 7, 16)
    first = layer(x, ids)[1].expert
    again = layer(torch.randn(2, 7, 16), ids)[1].expert  # same ids, different activations: same routing
    assert torch.equal(first, again)
    same = RoutedFFN(cfg("hash"))
    assert torch.equal(same.token_to_expert, layer.token_to_expert)


def test_reinforce_gradient_sign_on_toy_reward():
    torch.manual_seed(0)
    logits = torch.zeros(4, requires_grad=True)
    actions = torch.multinomial(torch.full((4,), 0.25), 4000, replacement=True)
    reward = (actions == 2).float()  # only expert 2 pays off
    log_prob = logits.log_softmax(-1)[actions]
    reinforce_loss(log_prob, reward, reward.mean()).backward()
    # Gradient descent must raise the rewarded expert's logit and lower the others.
    assert logits.grad[2] < 0
    assert (logits.grad[[0, 1, 3]] > 0).all()


def test_rlr_router_learns_rewarded_expert():
    torch.manual_seed(0)
    layer = RoutedFFN(cfg("rlr"))
    opt = torch.optim.SGD(layer.router.parameters(), lr=50.0)
    x = torch.randn(4, 32, 16)
    ids = torch.zeros(4, 32, dtype=torch.long)
    baseline = 0.0

    def p_expert1() -> float:
        return layer.router(x).softmax(-1)[..., 1].mean().item()

    before = p_expert1()
    for _ in range(30):
        layer.train()
        aux = layer(x, ids)[1]
        assert aux.log_prob.shape == aux.expert.shape == ids.shape
        reward = (aux.expert == 1).float()  # tokens sent to expert 1 are rewarded
        loss = reinforce_loss(aux.log_prob, reward, baseline)
        baseline = 0.9 * baseline + 0.1 * reward.mean().item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert p_expert1() > before + 0.3


@pytest.mark.parametrize("router", ["sbase", "hash", "rlr"])
def test_routed_ffn_shapes_stats_and_gradients(router):
    torch.manual_seed(0)
    layer = RoutedFFN(cfg(router, expert_ffn="geglu"))
    x = torch.randn(3, 10, 16, requires_grad=True)
    ids = torch.randint(0, 50, (3, 10))
    y, aux = layer(x, ids)
    assert y.shape == x.shape
    y.square().mean().backward()
    # Every expert gets a gradient tensor, even an idle one (DDP requires it).
    assert all(p.grad is not None for p in layer.experts.parameters())
    if router == "sbase":
        assert layer.router.weight.grad.abs().sum() > 0  # learns through the probability gate
    stats = aux.stats
    assert stats["load"].shape == (4,) and math.isclose(stats["load"].sum().item(), 1.0, rel_tol=1e-6)
    assert 0 <= stats["load_entropy"].item() <= math.log(4) + 1e-6
    if router == "rlr":
        assert aux.log_prob.shape == ids.shape and (aux.log_prob <= 0).all()
        assert aux.balance_loss is not None and aux.balance_loss.requires_grad
    else:
        assert aux.log_prob is None and aux.balance_loss is None
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x, ids)[0], layer(x, ids)[0])  # eval routing is deterministic


def test_one_expert_per_token_matches_expert_output():
    torch.manual_seed(0)
    layer = RoutedFFN(cfg("hash", expert_ffn="gelu"))
    x, ids = torch.randn(1, 6, 16), torch.arange(6)[None]
    y = layer(x, ids)[0]
    for t in range(6):
        e = layer.token_to_expert[t]
        assert torch.allclose(y[0, t], layer.experts[e](x[0, t][None])[0], atol=1e-6)


def test_balance_loss_values_and_gradient():
    uniform = torch.full((8, 4), 0.25)
    assert balance_loss(uniform, torch.arange(8) % 4, 4).item() == pytest.approx(1.0)
    collapsed = torch.zeros(8, 4)
    collapsed[:, 0] = 1.0
    assert balance_loss(collapsed, torch.zeros(8, dtype=torch.long), 4).item() == pytest.approx(4.0)
    logits = torch.zeros(8, 4, requires_grad=True)
    balance_loss(logits.softmax(-1), torch.zeros(8, dtype=torch.long), 4).backward()
    assert (logits.grad[:, 0] > 0).all()  # descent lowers the overloaded expert's probability


def test_routing_stats_and_bad_inputs():
    s = routing_stats(torch.tensor([0, 0, 1, 1]), 2, torch.full((4, 2), 0.5))
    assert torch.allclose(s["load"], torch.tensor([0.5, 0.5]))
    assert math.isclose(s["load_entropy"].item(), math.log(2), rel_tol=1e-6)
    assert math.isclose(s["router_entropy"].item(), math.log(2), rel_tol=1e-6)
    with pytest.raises(ValueError, match="unknown router 'bogus'"):
        RoutedFFN(cfg("bogus"))
    with pytest.raises(ValueError, match="n_experts must be >= 1, got 0"):
        RoutedFFN(cfg("sbase", n_experts=0))
    layer = RoutedFFN(cfg("sbase"))
    with pytest.raises(ValueError, match="disagree"):
        layer(torch.randn(2, 3, 16), torch.zeros(2, 4, dtype=torch.long))
    assert routed_layers(torch.nn.Sequential(layer, torch.nn.Linear(2, 2))) == [layer]


@pytest.mark.parametrize("router", ["sbase", "hash", "rlr"])
def test_routed_model_trains_on_cpu(tmp_path, router):
    from lm import CausalLM
    from lm_testutil import TINY, fit_and_val_losses, tiny_data

    torch.manual_seed(0)
    dm = tiny_data(tmp_path)
    module = CausalLM(model_overrides={**TINY, "ffn": "routed", "n_experts": 4, "router": router,
                                       "routing_frequency": 1}, lr=3e-3, warmup_steps=2)
    module.configure_model()
    assert len(routed_layers(module.model)) == 2
    before, trainer = fit_and_val_losses(module, dm, tmp_path, steps=30)
    m = trainer.callback_metrics
    assert m["val/loss"].item() < before - 1.0
    loads = [m[f"train/route0/load_e{e}"].item() for e in range(4)]
    assert sum(loads) == pytest.approx(1.0, abs=1e-5)
    assert "train/route1/load_entropy" in m and "val/route0/load_entropy" in m
    if router == "rlr":
        assert "train/reinforce_loss" in m and module.reward_baseline_set.item() == 1.0
        assert "train/route0/balance_loss" in m
        assert module.reward_baseline.item() < 0  # a running mean of log-likelihoods
    else:
        assert "train/reinforce_loss" not in m
