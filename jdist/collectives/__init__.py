"""Collective communication: reports of what compiled programs send."""
from jdist.collectives._report import COLLECTIVES as COLLECTIVES
from jdist.collectives._report import CollectiveStat as CollectiveStat
from jdist.collectives._report import CommReport as CommReport
from jdist.collectives._report import comm_report as comm_report

__all__ = ["COLLECTIVES", "CollectiveStat", "CommReport", "comm_report"]
