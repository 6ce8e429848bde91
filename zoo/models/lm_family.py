"""An LM family is one spec: its config table, its block choices and its Hugging Face adapter.

``LMFamily`` holds the registry names of a family (each a ``TransformerConfig`` of the one Transformer), the block
choices every member shares (FFN kind of ``zoo.models.lm_blocks``, norm, positions, tied embeddings, soft-caps...:
TransformerConfig fields), the published parameter counts its tests check, and the adapters that read and write its
Hugging Face checkpoints (``HFAdapter``: config.json fields and tensor names, both ways). ``zoo/models/lm_configs.py``
declares the families; ``zoo.weights.hf`` reads and writes through the adapters; the FLOP counter and the planner read
the same FFN table through the config. Adding a family is one ``LMFamily`` (and, to read/write HF checkpoints, one
``HFAdapter`` in ``zoo/models/lm_hf.py``). No torch here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from zoo.models.transformer import TransformerConfig


@dataclass(frozen=True)
class HFAdapter:
    """How one Hugging Face architecture maps onto the zoo Transformer, both ways.

    ``from_hf(cfg, source)`` turns a checked config.json dict into TransformerConfig fields (ValueError naming the
    field it cannot take); ``refuse(config)`` says why a config cannot be written as this architecture (None: it
    can); ``to_hf(config)`` is the config.json dict; ``names(config)`` maps our state_dict keys to the HF tensor names.
    """

    model_type: str
    architecture: str
    from_hf: Callable[[dict, str], dict[str, Any]]
    refuse: Callable[["TransformerConfig"], str | None]
    to_hf: Callable[["TransformerConfig"], dict[str, Any]]
    names: Callable[["TransformerConfig"], dict[str, str]]


@dataclass(frozen=True)
class LMFamily:
    """One model family: shared block choices, its named configs, published sizes and Hugging Face adapters."""

    name: str
    blocks: dict[str, Any]  # the architecture every member shares (ffn, norm_unit_offset, positions, tying, caps...)
    defaults: dict[str, Any] = field(default_factory=dict)  # sizes a member may change (vocab, context, RoPE base)
    configs: dict[str, "TransformerConfig"] = field(default_factory=dict)  # registry name -> config
    reported_params: dict[str, float] = field(default_factory=dict)  # registry name -> published parameter count
    hf: tuple[HFAdapter, ...] = ()  # the HF architectures this family reads and writes

    def add(self, name: str, reported: float | None = None, **fields: Any) -> None:
        """Declare member ``name``: the family's block choices and defaults with ``fields`` (its shape) on top."""
        from zoo.models.transformer import TransformerConfig

        if name in self.configs:
            raise ValueError(f"{self.name}: config {name!r} declared twice")
        changed = sorted(k for k, v in fields.items() if k in self.blocks and v != self.blocks[k])
        if changed:
            raise ValueError(f"{self.name}: {name!r} changes the family's block choices {changed}; declare another "
                             "family for another architecture")
        self.configs[name] = TransformerConfig(**{**self.blocks, **self.defaults, **fields})
        if reported is not None:
            self.reported_params[name] = reported


FAMILIES: dict[str, LMFamily] = {}


def register_family(family: LMFamily) -> LMFamily:
    """Add a family to the table (names of configs and HF model types must be new)."""
    taken = {n for f in FAMILIES.values() for n in f.configs} & set(family.configs)
    types = {a.model_type for f in FAMILIES.values() for a in f.hf} & {a.model_type for a in family.hf}
    if family.name in FAMILIES or taken or types:
        clash = sorted(taken | types) or family.name
        raise ValueError(f"family {family.name!r} clashes with a registered one: {clash}")
    FAMILIES[family.name] = family
    return family


def family_of(model: str) -> LMFamily:
    """The family that declares registry name ``model`` (KeyError if none)."""
    for family in FAMILIES.values():
        if model in family.configs:
            return family
    raise KeyError(model)


def hf_adapter(model_type: object, source: str = "config.json") -> HFAdapter:
    """The adapter that reads Hugging Face ``model_type``; a ValueError listing the supported ones otherwise."""
    adapters = {a.model_type: a for f in FAMILIES.values() for a in f.hf}
    if model_type not in adapters:
        raise ValueError(f"{source}: model_type={model_type!r} is not supported; from_hf reads {sorted(adapters)} "
                         f"(architectures {sorted(a.architecture for a in adapters.values())})")
    return adapters[model_type]  # type: ignore[index]


def export_adapter(config: "TransformerConfig") -> HFAdapter:
    """The first adapter able to write ``config``; a ValueError giving each architecture's reason otherwise."""
    reasons = []
    for family in FAMILIES.values():
        for adapter in family.hf:
            why = adapter.refuse(config)
            if why is None:
                return adapter
            reasons.append(f"{adapter.architecture}: {why}")
    raise ValueError("cannot export to Hugging Face: no architecture fits this config (" + "; ".join(reasons) + ")")
