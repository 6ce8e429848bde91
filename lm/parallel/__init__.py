"""Parallelism and planning: FLOP counting (``flops``, the one counter), device peaks and MFU (``hardware``), FSDP2
sharding (``sharding``) and the memory / step-time planner (``plan``). The lowest layer of lm: imports only ``zoo``."""
