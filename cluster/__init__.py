"""Where work runs: starting or joining Ray, deciding resources and placement, submitting jobs, and the cluster
definitions (``cluster/kuberay``, ``cluster/launcher``, ``cluster/Dockerfile``) with their checks (``manifests``)."""

from cluster.placement import EmbedActorPlan, NodeResources, plan_embed_actors
from cluster.runtime import alive_nodes, init_ray

__all__ = ["EmbedActorPlan", "NodeResources", "alive_nodes", "init_ray", "plan_embed_actors"]
