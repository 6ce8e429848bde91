"""byol-zoo's model zoo: named architectures, their weights, and what every method shares."""
__all__ = ["available", "create", "register", "load_backbone", "list_pretrained", "from_hf", "load_lm"]


def __getattr__(name: str):
    # Everything here imports torch; importing it only when asked keeps `zoo --help` (zoo.cli) free of torch.
    if name in ("available", "register"):
        from zoo.models import registry

        return getattr(registry, name)
    if name == "create":  # through the weights layer, which gives the registry its pretrained=True loader
        from zoo.weights.create import create

        return create
    if name == "load_backbone":
        from zoo.weights import load_backbone

        return load_backbone
    if name == "list_pretrained":  # no torch: the table is data
        from zoo.weights.pretrained import list_pretrained

        return list_pretrained
    if name == "from_hf":
        from zoo.weights.hf import from_hf

        return from_hf
    if name == "load_lm":
        from zoo.weights.lm import load_lm

        return load_lm
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")
