"""The one table of a Transformer's FFN choices, read by the Transformer, the FLOP counter, the planner and the
Hugging Face adapters (no module compares FFN names itself). No torch here: the CLI fronts and the planner read it.

A dense FFN kind is gated (``down(act(gate(x)) * up(x))``: GeGLU, SwiGLU) or a plain MLP (``down(act(up(x)))``);
``routed`` is not a kind of this table but a layer that holds experts of one of these kinds (``expert_ffn``).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FfnKind:
    """One dense FFN kind: its gating, its activation and what the counters need to know about it."""

    name: str
    gated: bool
    activation: str  # "gelu_tanh" | "gelu" | "silu": the Transformer's activation function (zoo.models.transformer)
    hf_activation: str  # the name Hugging Face configs give the activation (hidden_act / hidden_activation)

    @property
    def matmuls(self) -> int:
        """d_model x d_ff weight matrices per layer: gate, up and down when gated, else up and down."""
        return 3 if self.gated else 2

    @property
    def saved_activations(self) -> int:
        """[tokens, d_ff] tensors a training step keeps for backward: gated: gate, act(gate), up, product; else up,
        act(up)."""
        return 4 if self.gated else 2


FFN_KINDS: dict[str, FfnKind] = {
    "geglu": FfnKind("geglu", gated=True, activation="gelu_tanh", hf_activation="gelu_pytorch_tanh"),  # Gemma
    "swiglu": FfnKind("swiglu", gated=True, activation="silu", hf_activation="silu"),  # Llama (Shazeer 2020)
    "gelu": FfnKind("gelu", gated=False, activation="gelu", hf_activation="gelu"),  # Gopher / Chinchilla: exact GELU
}
ROUTED = "routed"  # the FFN field's value for a mixture-of-experts layer (zoo.models.routing.RoutedFFN)


def ffn_kind(name: str, field: str = "ffn") -> FfnKind:
    """The table entry of a dense FFN kind; an unknown name is a ValueError naming ``field`` and the choices."""
    try:
        return FFN_KINDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"{field}={name!r}; expected one of {tuple(FFN_KINDS)}") from None


def layer_ffn_kind(config: object, routed: bool) -> FfnKind:
    """The dense kind a layer computes with: the config's FFN, or for a routed layer each expert's."""
    return ffn_kind(getattr(config, "expert_ffn") if routed else getattr(config, "ffn"))
