"""byol-zoo's model zoo: named architectures, their weights, and what every method shares."""
from zoo.models.registry import available, create, register

__all__ = ["available", "create", "register", "load_backbone", "from_hf", "load_lm"]


def __getattr__(name: str):
    # Weight loaders pull in heavier modules; import them only when asked for.
    if name == "load_backbone":
        from zoo.weights import load_backbone

        return load_backbone
    if name == "from_hf":
        from zoo.weights.hf import from_hf

        return from_hf
    if name == "load_lm":
        from zoo.weights.lm import load_lm

        return load_lm
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")
