"""Language-model training on the shared trainer: causal LM, Gemma 2 distillation, evals, scaling laws."""
from lm.base import LMModule
from lm.causal_lm import CausalLM
from lm.distill import Distill
from lm.multimodal import MultimodalLM
from zoo.weights.lm import load_lm

__all__ = ["LMModule", "CausalLM", "Distill", "MultimodalLM", "load_lm"]
