"""Language-model training on the shared trainer: causal LM, Gemma 2 distillation, evals, scaling laws."""
from lm.causal_lm import CausalLM
from lm.distill import Distill

__all__ = ["CausalLM", "Distill"]
