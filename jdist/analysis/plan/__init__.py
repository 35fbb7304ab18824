"""``jdist.plan``: choose a layout for a model and a cluster before renting it."""
from jdist.analysis.plan._cluster import Cluster as Cluster
from jdist.analysis.plan._cluster import Link as Link
from jdist.analysis.plan._cluster import available_clusters as available_clusters
from jdist.analysis.plan._cluster import load_cluster as load_cluster
from jdist.analysis.plan._costs import Collective as Collective
from jdist.analysis.plan._costs import Costs as Costs
from jdist.analysis.plan._costs import textbook_costs as textbook_costs
from jdist.analysis.plan._layout import Layout as Layout
from jdist.analysis.plan._layout import candidates as candidates
from jdist.analysis.plan._shape import TransformerShape as TransformerShape
from jdist.analysis.plan._time import SOFTWARE_EFFICIENCY as SOFTWARE_EFFICIENCY
from jdist.analysis.plan._time import Timing as Timing
from jdist.analysis.plan._time import step_time as step_time
