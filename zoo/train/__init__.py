"""Training shared by every method: the Trainer setup, run-folder guards, synchronised batch norm."""
