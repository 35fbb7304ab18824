"""What a run costs and how it went: collectives read from compiled programs, textbook figures, MFU, plots.

``comm_report`` lists the collectives of a compiled program; ``theory`` holds the textbook byte counts
to compare them with; ``mfu`` / ``peak_flops`` measure arithmetic against the chip's peak; ``plot_runs``
draws the metrics of run directories.
"""
from jdist.analysis import theory as theory
from jdist.analysis._comm import COLLECTIVES as COLLECTIVES
from jdist.analysis._comm import CollectiveStat as CollectiveStat
from jdist.analysis._comm import CommReport as CommReport
from jdist.analysis._comm import comm_report as comm_report
from jdist.analysis.perf import mfu as mfu
from jdist.analysis.perf import peak_flops as peak_flops

__all__ = ["COLLECTIVES", "CollectiveStat", "CommReport", "comm_report", "mfu", "peak_flops", "theory"]
