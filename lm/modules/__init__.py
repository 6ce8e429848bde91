"""The LM LightningModules: the ``LMModule`` base (training step, MFU, checkpoints) and its siblings ``CausalLM``,
``Distill`` and ``MultimodalLM``, with their optimiser, metrics and routing loss. Imports ``lm.parallel``, never
``lm.evals``, ``lm.scaling`` or ``lm.cli``."""
