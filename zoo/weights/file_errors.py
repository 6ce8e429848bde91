"""The refusals of weight files (unreadable, missing, a folder, unsafe), below every reader: the safe loader
(``safe_load.py``), the guarded unpickler (``safe_pickle.py``, ``pickle_builtins.py``) and the torch-file prescan
(``torch_prescan.py``) all raise them without importing each other in a circle."""
from __future__ import annotations

from zoo.errors import UsageError

__all__ = ["UnreadableFileError", "MissingFileError", "FolderNotFileError", "UnsafeFileError",
           "forbidden_global_error"]


class UnreadableFileError(UsageError):
    """A weight file that cannot be read (empty, truncated, corrupt, another format): ``zoo`` commands print the one
    line and exit 2, like any refused input."""


class MissingFileError(UnreadableFileError, FileNotFoundError):
    """A weight path that does not exist: a FileNotFoundError for callers, one line and exit 2 for ``zoo``."""


class FolderNotFileError(UnreadableFileError, IsADirectoryError):
    """A folder given where a weight file is expected."""


class UnsafeFileError(UnreadableFileError):
    """A weight file asked to import or call something outside the safe allow-list; it was not executed."""


def forbidden_global_error(label: str, name: str) -> UnsafeFileError:
    """The one-line refusal of a torch file whose pickle names ``name``, a global outside the allow-list."""
    return UnsafeFileError(
        f"{label} is a pickle that references {name}, which is not allowed (loading uses "
        "weights_only=True so pickled code is never executed). If you trust this file, re-save its tensors with "
        "safetensors or torch.save(state_dict); if it is an official BYOL .pkl, give it a .pkl name.")
