"""Where work runs: starting or joining Ray, and deciding resources and placement."""

from cluster.placement import EmbedActorPlan, NodeResources, plan_embed_actors
from cluster.runtime import alive_nodes, init_ray

__all__ = ["EmbedActorPlan", "NodeResources", "alive_nodes", "init_ray", "plan_embed_actors"]
