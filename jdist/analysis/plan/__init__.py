"""``jdist.plan``: choose a layout for a model and a cluster before renting it.

``plan(model, cluster, batch=...)`` enumerates the layouts jdist can run (data parallel with gradient
accumulation, GSPMD data x FSDP x tensor, data x pipeline; each remat policy), costs each by the textbook,
compiles the best ones from shapes on emulated CPU devices, and ranks them by a predicted step time. The
pieces are public for other uses: ``load_cluster`` (clusters as TOML data), ``TransformerShape`` (a model's
sizes), ``textbook_costs`` and ``step_time`` (the analytical model, validated against published runs in
benchmarks/plan_validation.py).
"""
from jdist.analysis.plan._cluster import Cluster as Cluster
from jdist.analysis.plan._cluster import Link as Link
from jdist.analysis.plan._cluster import available_clusters as available_clusters
from jdist.analysis.plan._cluster import load_cluster as load_cluster
from jdist.analysis.plan._config import layout_config as layout_config
from jdist.analysis.plan._config import ConfiguredRun as ConfiguredRun
from jdist.analysis.plan._config import read_plan_config as read_plan_config
from jdist.analysis.plan._config import strategy_from_config as strategy_from_config
from jdist.analysis.plan._costs import Collective as Collective
from jdist.analysis.plan._costs import Costs as Costs
from jdist.analysis.plan._costs import textbook_costs as textbook_costs
from jdist.analysis.plan._layout import Layout as Layout
from jdist.analysis.plan._layout import candidates as candidates
from jdist.analysis.plan._plan import Compiled as Compiled
from jdist.analysis.plan._plan import DoesNotFitError as DoesNotFitError
from jdist.analysis.plan._plan import Plan as Plan
from jdist.analysis.plan._plan import PlanRow as PlanRow
from jdist.analysis.plan._plan import plan as plan
from jdist.analysis.plan._shape import TransformerShape as TransformerShape
from jdist.analysis.plan._time import SOFTWARE_EFFICIENCY as SOFTWARE_EFFICIENCY
from jdist.analysis.plan._time import Timing as Timing
from jdist.analysis.plan._time import step_time as step_time

__all__ = ["Cluster", "Collective", "Compiled", "ConfiguredRun", "Costs", "DoesNotFitError", "Layout", "Link", "Plan",
           "PlanRow", "SOFTWARE_EFFICIENCY", "Timing", "TransformerShape", "available_clusters", "candidates",
           "layout_config", "load_cluster", "plan", "read_plan_config", "step_time", "strategy_from_config",
           "textbook_costs"]
