"""Routed feed-forward layers (Clark et al. 2022): one expert per token, chosen by S-BASE, Hash or RL-R.

``RoutedFFN(config)`` replaces the dense FFN of a Transformer layer; it is called as ``ffn(x, input_ids)`` with
x [B, T, D] and input_ids [B, T] and returns [B, T, D]. Every expert is the config's dense FFN kind (GeGLU or
GELU MLP of the config's hidden size), so a routed model spends the same FLOPs per token as its dense base
(plus a D x E router matmul).

The layer returns its auxiliary outputs (``RoutingAux``: chosen experts, the RL-R policy's log-probabilities, the
load-balancing term, statistics) next to its output instead of keeping them on the module; the Transformer hands
them up in ``TransformerOutput.routing``. The training losses built from them (REINFORCE) live with the LM training
code in ``lm/``; this module holds the model maths (Sinkhorn balancing, statistics) as pure functions kept apart from
the module so each can be tested against its formula.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

# The experts are the Transformer's dense FFN (zoo.models.ffn); routing never imports the Transformer, which imports
# this module for its routed layers. The config is a zoo.models.transformer.TransformerConfig.
from zoo.models.ffn import DenseFFN
from zoo.models.lm_blocks import ffn_kind

ROUTERS = ("sbase", "hash", "rlr")


# ----------------------------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------------------------
def sinkhorn(logits: Tensor, n_iters: int = 8) -> Tensor:
    """Balance exp(logits) [N, E] into a transport plan with row sums 1/N and column sums 1/E (log domain)."""
    if logits.dim() != 2:
        raise ValueError(f"sinkhorn expects logits of shape [tokens, experts], got {tuple(logits.shape)}")
    n, e = logits.shape
    # Log domain because exp(logits) over- or under-flows for confident routers.
    log_p = logits.float()
    log_row, log_col = -math.log(n), -math.log(e)
    for _ in range(n_iters):
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True) + log_col
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True) + log_row
    return log_p.exp()


def expert_bias(plan: Tensor, logits: Tensor) -> Tensor:
    """Per-expert log-bias b [E] with argmax_e plan[i] == argmax_e (logits[i] + b) for every token i.

    Sinkhorn only ever adds a row constant a_i and a column constant b_e to the logits, so
    log plan - logits = a_i + b_e; the row constant cannot change a row's argmax. Mean-centred.
    """
    diff = plan.clamp_min(1e-30).log() - logits.float()
    bias = diff.mean(0)
    return bias - bias.mean()


def load_fractions(expert_idx: Tensor, n_experts: int) -> Tensor:
    """Fraction of tokens sent to each expert, [E] summing to 1."""
    # scatter_add, not bincount: bincount's output length depends on the data, which breaks a compiled graph.
    idx = expert_idx.reshape(-1)
    counts = torch.zeros(n_experts, device=idx.device).scatter_add_(0, idx, torch.ones(idx.shape, device=idx.device))
    return counts / counts.sum().clamp_min(1.0)


def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy in nats of probability vectors along ``dim`` (0 log 0 = 0)."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim)


def routing_stats(expert_idx: Tensor, n_experts: int, probs: Tensor | None = None) -> dict[str, Tensor]:
    """Per-expert load, entropy of the load (log E when balanced) and mean per-token router entropy."""
    load = load_fractions(expert_idx, n_experts)
    stats = {"load": load, "load_entropy": entropy(load)}
    if probs is not None:
        stats["router_entropy"] = entropy(probs.float()).mean()
    return stats


def balance_loss(probs: Tensor, expert_idx: Tensor, n_experts: int) -> Tensor:
    """Switch-Transformer load-balancing loss E * sum_e f_e P_e (1 when uniform); gradient flows through P only."""
    f = load_fractions(expert_idx.detach(), n_experts)
    return n_experts * (f * probs.float().mean(0)).sum()


def hash_table(vocab_size: int, n_experts: int, seed: int = 0) -> Tensor:
    """Fixed random token-id -> expert map: a seeded balanced shuffle, so every expert gets ~vocab/E ids."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(vocab_size, generator=g)
    table = torch.empty(vocab_size, dtype=torch.long)
    table[perm] = torch.arange(vocab_size) % n_experts
    return table


class RoutingAux(NamedTuple):
    """What one routed layer's forward reports besides its output (all [B, T] tensors follow the input's shape)."""

    expert: Tensor  # [B, T] expert chosen per token (no gradient)
    log_prob: Tensor | None  # [B, T] log-probability of the chosen expert; RL-R only (the policy-gradient path)
    balance_loss: Tensor | None  # Switch load-balancing term E * sum_e f_e P_e; RL-R only (it has no other balancer)
    stats: dict[str, Tensor]  # "load" [E], "load_entropy", and "router_entropy" for learnt routers (no gradient)


# ----------------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------------
def expert_config(config: Any) -> Any:
    """The dense config each expert is built from: ffn = the config's expert kind (``expert_ffn``, default GeGLU)."""
    # ffn="routed" says nothing about the experts' MLP: Gopher-style models set expert_ffn="gelu", Llama "swiglu".
    kind = ffn_kind(config.expert_ffn, "expert_ffn").name  # a dense kind of zoo.models.lm_blocks' table
    return config.replace(ffn=kind)  # also resets the routed-only fields, which a dense config refuses


class RoutedFFN(nn.Module):
    """A routed FFN layer: each token goes to exactly one of ``n_experts`` experts picked by the config's router."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.d_model = config.d_model
        self.n_experts = int(config.n_experts)
        self.router_kind = str(config.router)
        if self.router_kind not in ROUTERS:
            raise ValueError(f"unknown router {self.router_kind!r}; choose one of {ROUTERS}")
        if self.n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {self.n_experts}")
        self.sinkhorn_iters = int(config.sinkhorn_iters)
        # Experts are exactly the dense FFN (same class, same init), so routed vs dense compares like with like.
        dense = expert_config(config)
        self.experts = nn.ModuleList(DenseFFN(dense) for _ in range(self.n_experts))
        # S-BASE: running mean of the Sinkhorn expert biases. Eval routes each token alone by
        # argmax(logits + bias): causal (no other tokens involved) and balanced the way training was.
        if self.router_kind == "sbase":
            self.register_buffer("balance_bias", torch.zeros(self.n_experts), persistent=True)
        self.bias_momentum = float(config.balance_bias_momentum)
        if self.router_kind == "hash":
            self.vocab_size, self.hash_seed = int(config.vocab_size), int(config.hash_seed)
            # A buffer, not a parameter: the map is fixed, but it must travel with checkpoints and devices.
            self.register_buffer("token_to_expert", hash_table(self.vocab_size, self.n_experts, self.hash_seed),
                                 persistent=True)
            self.router = None
        else:
            # Initialised by the Transformer with its other Linear layers (normal, init_std).
            self.router = nn.Linear(self.d_model, self.n_experts, bias=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Give the buffers their build-time values: the seeded hash table, a zero S-BASE bias.

        The parameters belong to the experts and the router (their own ``reset_parameters``). Torch's convention, as
        for BatchNorm's running statistics: a model built on the meta device and allocated with ``to_empty()`` (sharded
        training) calls this, so every rank holds exactly the buffers of a normal build, whatever its random state.
        """
        if self.router_kind == "hash":
            self.token_to_expert.copy_(hash_table(self.vocab_size, self.n_experts, self.hash_seed))
        elif self.router_kind == "sbase":
            self.balance_bias.zero_()

    def route(self, x: Tensor, input_ids: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None,
                                                                   Tensor | None, Tensor | None]:
        """Pick one expert per token of x [N, D]: (expert indices [N], gate [N] or None (ungated), the chosen
        expert's log-probability [N] (RL-R) or None, the balancing loss (RL-R) or None, router probs [N, E] or None)."""
        if self.router_kind == "hash":
            if input_ids is None:
                raise ValueError("the hash router picks experts by token id: pass input_ids")
            return self.token_to_expert[input_ids.reshape(-1)], None, None, None, None
        logits = self.router(x).float()  # [N, E]; float32 because Sinkhorn and sampling need the range
        probs = logits.softmax(-1)
        if self.router_kind == "sbase":
            with torch.no_grad():
                if self.training:
                    plan = sinkhorn(logits, self.sinkhorn_iters)
                    idx = plan.argmax(-1)
                    m = self.bias_momentum
                    self.balance_bias.mul_(m).add_(expert_bias(plan, logits), alpha=1 - m)
                else:
                    # Tokens may arrive one at a time (generation), so no batch-wide Sinkhorn here; Clark et al.
                    # route greedily at inference, and greedy + the learnt balance bias keeps the training split.
                    idx = (logits + self.balance_bias).argmax(-1)
            return idx, probs.gather(-1, idx[:, None]).squeeze(-1), None, None, probs
        # rlr: the router is a policy; the LM training code adds the REINFORCE loss from the log-probability.
        with torch.no_grad():
            idx = torch.multinomial(probs, 1).squeeze(-1) if self.training else probs.argmax(-1)
        log_prob = logits.log_softmax(-1).gather(-1, idx[:, None]).squeeze(-1)
        # REINFORCE alone lets the expert that got more tokens early win ever more (it trains faster, so earns
        # more reward): the LM module can add this balancing term (balance_weight) against collapse.
        return idx, None, log_prob, balance_loss(probs, idx, self.n_experts), probs

    def forward(self, x: Tensor, input_ids: Tensor | None = None) -> tuple[Tensor, RoutingAux]:
        """Route each token of x [B, T, D] (ids [B, T], needed by the hash router) to one expert.

        Returns the output [B, T, D] and the layer's RoutingAux.
        """
        if input_ids is not None and x.shape[:2] != input_ids.shape:
            raise ValueError(f"x {tuple(x.shape)} and input_ids {tuple(input_ids.shape)} disagree on [B, T]")
        shape = x.shape[:2]
        flat = x.reshape(-1, self.d_model)
        idx, gate, log_prob, balance, probs = self.route(flat, input_ids)
        stats = routing_stats(idx.detach(), self.n_experts, None if probs is None else probs.detach())
        aux = RoutingAux(idx.detach().reshape(shape), None if log_prob is None else log_prob.reshape(shape),
                         balance, stats)
        if torch.compiler.is_compiling():
            return self._dispatch_static(flat, idx, gate).reshape_as(x), aux
        # Sort tokens by expert once, run each expert on its contiguous chunk, scatter back: one host sync (the
        # chunk sizes) per layer, and with one expert per token no token is ever dropped (no capacity factor).
        order = torch.argsort(idx)
        counts = torch.bincount(idx, minlength=self.n_experts).tolist()
        chunks = flat.index_select(0, order).split(counts)
        # An idle expert still runs on zero rows, so its weights stay in the graph (DDP wants a gradient, even
        # a zero one, for every parameter).
        y = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, chunks)])
        if gate is not None:
            y = y * gate.index_select(0, order)[:, None].to(y.dtype)
        out = torch.empty_like(flat).index_copy_(0, order, y.to(flat.dtype))
        return out.reshape_as(x), aux


    def _dispatch_static(self, flat: Tensor, idx: Tensor, gate: Tensor | None) -> Tensor:
        """Compiled path: every expert runs on every token and each token keeps its own expert's row.

        Exact (the same per-row maths as the sorted dispatch) with static shapes and no host sync, so the compiled
        step has no graph break; the price is E times the FFN FLOPs. Chunk sizes per expert are data: a
        sync-free grouped GEMM (torch._grouped_mm; bf16 on sm90+ only) is the GPU-scale replacement.
        """
        y = self.experts[0](flat)  # rows of other experts are overwritten below
        for e in range(1, self.n_experts):
            y = torch.where((idx == e)[:, None], self.experts[e](flat), y)
        if gate is not None:
            y = y * gate[:, None].to(y.dtype)
        return y.to(flat.dtype)


def routed_layers(model: nn.Module) -> list[RoutedFFN]:
    """Every RoutedFFN inside ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, RoutedFFN)]
