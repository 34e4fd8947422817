"""Files in and out: weight files and checkpoints read without running code, atomic writes,
Lightning's checkpoint I/O and the run checkpoint callback, the cache folder, export of a
merged model, and downloads without a network (``offline``: the cache first, else one quick
check and a one-line error).

May import: :mod:`adamerge.errors` and third-party packages only; ``export`` works on any module
through its ``load_coefficients`` / ``merged`` / ``heads`` (duck typing), so that every other
folder can build on this one.
"""

from .checkpoints import (CheckpointError, StateDict, atomic_write, load_state_dict, read_checkpoint,
                          save_state_dict, write_json_atomic)

__all__ = ["CheckpointError", "StateDict", "atomic_write", "load_state_dict", "read_checkpoint",
           "save_state_dict", "write_json_atomic"]
