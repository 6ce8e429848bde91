"""Language-model training on the shared trainer: causal LM, Gemma 2 distillation, evals, scaling laws.

Subpackages, lowest first (each imports only those before it, and ``zoo``):
``lm.parallel`` (FLOP counting, device peaks, FSDP2 sharding, the planner) < ``lm.modules`` (the LightningModules)
< ``lm.evals`` and ``lm.scaling`` < ``lm.cli`` (the argument fronts of ``zoo eval|scaling|plan|consolidate``).

The modules are imported on first use of a name (``lm.CausalLM`` in a config's ``class_path`` works as before), so
``lm.cli``'s fronts parse and print help without torch.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

# name -> the module that defines it
_EXPORTS = {"LMModule": "lm.modules.base", "CausalLM": "lm.modules.causal_lm", "Distill": "lm.modules.distill",
            "MultimodalLM": "lm.modules.multimodal", "load_lm": "zoo.weights.lm"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
