"""The training loop, its callbacks, checkpoints and metric logs."""
from jdist.train._callbacks import Callback as Callback
from jdist.train._callbacks import EarlyStopping as EarlyStopping
from jdist.train._callbacks import NanGuard as NanGuard
from jdist.train._callbacks import PrintLogger as PrintLogger
from jdist.train._callbacks import ProgressBar as ProgressBar
from jdist.train._checkpoint import CheckpointConfig as CheckpointConfig
from jdist.train._checkpoint import Checkpointer as Checkpointer
from jdist.train._checkpoint import CheckpointError as CheckpointError
from jdist.train._loop import FitResult as FitResult
from jdist.train._loop import LoopControl as LoopControl
from jdist.train._loop import fit as fit
from jdist.train._signals import Interrupted as Interrupted
from jdist.train._signals import Terminated as Terminated
from jdist.train._writers import read_jsonl as read_jsonl

__all__ = ["Callback", "CheckpointConfig", "CheckpointError", "Checkpointer", "EarlyStopping", "FitResult",
           "Interrupted", "LoopControl", "NanGuard", "PrintLogger", "ProgressBar", "Terminated", "fit", "read_jsonl"]
