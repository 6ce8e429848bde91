"""The one reader of our Lightning checkpoints, and the contract a checkpoint carries for its readers.

Every method writes ``checkpoint["zoo"]``: ``{"format": 1, "kind": ..., ...}``. The reader here knows nothing of
images or language models: it loads the file through the safe loader (``weights_only=True``) and hands back the
checkpoint and its contract; each kind's loader (``zoo.load_backbone`` for ``"image-encoder"``, the LM loader for
``"lm"``) interprets the rest. For ``"image-encoder"`` the contract holds ``arch``, ``overrides``, ``encoders``
(branch -> state-dict prefix) and ``classifier`` (a prefix or None).
"""
from __future__ import annotations

import os
from typing import Any

from zoo.weights.safe_load import UnsafeFileError, safe_torch_load

__all__ = ["CONTRACT_KEY", "CONTRACT_VERSION", "checkpoint_contract", "is_lightning_checkpoint", "load_torch_file",
           "read_checkpoint"]

CONTRACT_KEY = "zoo"
CONTRACT_VERSION = 1  # the newest contract format this reader understands


def load_torch_file(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """Whatever a torch file holds, through the safe loader; hostile or custom-object files get one clear error."""
    try:
        return safe_torch_load(path, map_location=map_location)
    except UnsafeFileError as err:
        if "references" not in str(err):  # a bomb or a malformed graph: the hint about custom objects is no help
            raise
        raise UnsafeFileError(f"{err} (Lightning checkpoints whose hyper-parameters hold custom objects: re-save "
                              "them with plain hyper-parameters, or export the encoder with the code that made it.)"
                              ) from None


def is_lightning_checkpoint(obj: Any) -> bool:
    """Does ``obj`` look like a Lightning checkpoint (a ``state_dict`` plus Lightning's bookkeeping)?"""
    return isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) and (
        "hyper_parameters" in obj or "pytorch-lightning_version" in obj or CONTRACT_KEY in obj)


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """A Lightning checkpoint as a dict, loaded safely; a file that is not one is refused, naming it."""
    obj = load_torch_file(path, map_location)
    if not is_lightning_checkpoint(obj):
        raise ValueError(f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict' with hyper-parameters); "
                         "pass a .ckpt written by `zoo fit`.")
    return obj


def checkpoint_contract(ckpt: dict[str, Any], source: str = "checkpoint") -> dict[str, Any] | None:
    """The checkpoint's contract (``ckpt["zoo"]``), checked; None for files written before contracts existed."""
    contract = ckpt.get(CONTRACT_KEY)
    if contract is None:
        return None
    if not isinstance(contract, dict) or not isinstance(contract.get("kind"), str) or not isinstance(
            contract.get("format"), int):
        raise ValueError(f"{source}: the checkpoint's '{CONTRACT_KEY}' entry is malformed ({contract!r:.120}); "
                         "it needs an integer 'format' and a 'kind': re-save the checkpoint with the code that made it.")
    if contract["format"] > CONTRACT_VERSION:
        raise ValueError(f"{source}: checkpoint contract format {contract['format']} is newer than this byol-zoo "
                         f"reads (up to {CONTRACT_VERSION}); upgrade byol-zoo.")
    return contract
