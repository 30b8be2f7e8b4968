"""Placement of the serving app's deployments (cluster.placement.plan_serving), without Ray."""

import pytest

from cluster.placement import NodeResources, plan_serving, shard_groups
from configs.errors import RagtuneError


@pytest.mark.parametrize("shards, groups", [(1, None), (3, None), (8, None), (20, None), (7, 3), (5, 5), (64, 6)])
def test_shard_groups_hold_every_shard_once_in_near_equal_contiguous_runs(shards, groups):
    g = shard_groups(shards, groups)
    assert [s for grp in g for s in grp] == list(range(shards))
    assert len(g) == (groups or min(shards, 8))
    sizes = [len(x) for x in g]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    with pytest.raises(RagtuneError, match=rf"shards.groups = {shards + 1} but the index has {shards}"):
        shard_groups(shards, shards + 1)


def test_a_laptop_runs_everything_on_cpu_with_reservations_scaled_to_fit():
    plan = plan_serving([NodeResources(cpus=2)], num_shards=2)
    assert plan.groups == [[0], [1]]
    assert plan.generator.device == plan.searcher.device == "cpu" and plan.generator.num_gpus == 0
    total = plan.embedder.num_cpus + plan.generator.num_cpus + 2 * plan.searcher.num_cpus + 2 * plan.light.num_cpus
    assert total <= 2 + 1e-9 and plan.embedder.num_cpus > plan.searcher.num_cpus > plan.light.num_cpus > 0
    assert plan.embedder.threads == 2 and plan.searcher.threads == 1 and "scaled" in plan.reason
    big = plan_serving([NodeResources(cpus=32)] * 2, num_shards=4)
    assert big.embedder.num_cpus == 1 and big.searcher.num_cpus == 0.5 and big.embedder.threads == 4
    assert "scaled" not in big.reason


def test_gpus_go_to_the_generator_first_and_searchers_share_the_rest():
    nodes = [NodeResources(cpus=16, gpus=4)]
    plan = plan_serving(nodes, num_shards=8, groups=4, generator_replicas=2)
    assert plan.generator.device == "gpu" and plan.generator.num_gpus == 1
    assert plan.searcher.device == "gpu" and plan.searcher.num_gpus == 0.5  # 2 GPUs left for 4 searchers
    assert plan.embedder.device == "cpu" and plan.embedder.num_gpus == 0
    full = plan_serving([NodeResources(cpus=16, gpus=1)], num_shards=2)
    assert full.generator.num_gpus == 1 and full.searcher.device == "cpu"  # auto: nothing left, CPU search
    with pytest.raises(RagtuneError, match="shards.device = 'gpu' but no GPU is left"):
        plan_serving([NodeResources(cpus=16, gpus=1)], num_shards=2, searcher_device="gpu")
    with pytest.raises(RagtuneError, match=r"generator.replicas = 3 GPU replicas but the cluster has 2 GPU"):
        plan_serving([NodeResources(cpus=16, gpus=2)], num_shards=2, generator_replicas=3)
    with pytest.raises(RagtuneError, match="Fix: set generator.device to auto or cpu"):
        plan_serving([NodeResources(cpus=16)], num_shards=2, generator_device="gpu")
    cpu = plan_serving(nodes, num_shards=2, generator_device="cpu", searcher_device="cpu")
    assert cpu.generator.num_gpus == 0 and cpu.searcher.num_gpus == 0


def test_explicit_reservations_are_kept_and_must_fit():
    plan = plan_serving([NodeResources(cpus=4)], num_shards=2, num_cpus={"generator": 2.0}, threads={"searcher": 3})
    assert plan.generator.num_cpus == 2.0 and plan.searcher.threads == 3
    with pytest.raises(RagtuneError, match="exceed the cluster's 4 CPUs"):
        plan_serving([NodeResources(cpus=4)], num_shards=2, embedder_replicas=3, num_cpus={"embedder": 2.0})
    with pytest.raises(RagtuneError, match="no alive node"):
        plan_serving([], num_shards=2)


# --- spreading a shard group's replicas over nodes (Serve's max_replicas_per_node) ------------------------------------

@pytest.mark.parametrize("replicas", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize("capacity", [[1], [4], [1, 1], [2, 2], [8, 1], [8, 0, 0], [1, 1, 1], [3, 1, 1], [2, 2, 2, 2],
                                      [16, 16], [1] * 5])
def test_replicas_per_node_spreads_every_replica_and_never_all_on_one_node(replicas, capacity):
    from cluster.placement import replicas_per_node

    limit = replicas_per_node(replicas, capacity)
    hosts = [c for c in capacity if c >= 1]
    if limit is None:  # nothing to spread, or no limit below `replicas` that places them all
        assert replicas < 2 or len(hosts) < 2 or all(sum(min(n, c) for c in hosts) < replicas
                                                     for n in range(1, replicas))
        return
    assert 1 <= limit < replicas  # no node may hold every replica: a lost node leaves one elsewhere
    assert sum(min(limit, c) for c in hosts) >= replicas  # and every replica has a place
    assert limit == 1 or sum(min(limit - 1, c) for c in hosts) < replicas  # the tightest such limit


def test_serving_plan_spreads_searcher_replicas_where_the_cluster_has_nodes():
    one = plan_serving([NodeResources(cpus=2)], num_shards=2, searcher_replicas=2)
    assert one.searcher_max_per_node is None  # a laptop: nothing to spread over
    three = plan_serving([NodeResources(cpus=4), NodeResources(cpus=1), NodeResources(cpus=1)], num_shards=2,
                         searcher_replicas=2)
    assert three.searcher_max_per_node == 1 and "at most 1 replica(s) of a shard group per node" in three.reason
    assert plan_serving([NodeResources(cpus=8)] * 3, num_shards=2).searcher_max_per_node is None  # one replica
    scaled = plan_serving([NodeResources(cpus=8)] * 2, num_shards=2, searcher_replicas=1, searcher_max_replicas=5)
    assert scaled.searcher_max_per_node == 3  # autoscaling up to 5 on 2 nodes
    # a node too small for a second replica: the big one takes the rest, never all of them
    uneven = plan_serving([NodeResources(cpus=32), NodeResources(cpus=1)], num_shards=1, searcher_replicas=4,
                          num_cpus={"searcher": 1.0})
    assert uneven.searcher_max_per_node == 3
    gpus = plan_serving([NodeResources(cpus=16, gpus=1), NodeResources(cpus=16, gpus=1)], num_shards=2,
                        searcher_replicas=2, generator_device="cpu")
    assert gpus.searcher.device == "gpu" and gpus.searcher_max_per_node == 1


# --- the layout: fused when the whole index fits one replica's memory budget, else split ------------------------------

GIB = 2**30


@pytest.mark.parametrize("index_gib, node_gib, share, want", [
    (0.1, 8, 0.25, "fused"), (2.0, 8, 0.25, "fused"), (2.1, 8, 0.25, "split"), (2.1, 8, 0.5, "fused"),
    (30, 64, 0.25, "split"), (1.0, 0, 0.25, "split"),  # node memory unknown: split
])
def test_auto_layout_is_fused_when_the_index_fits_the_smallest_nodes_share(index_gib, node_gib, share, want):
    nodes = [NodeResources(cpus=8, memory=node_gib * GIB), NodeResources(cpus=8, memory=4 * node_gib * GIB)]
    plan = plan_serving(nodes, num_shards=4, layout="auto", index_bytes=int(index_gib * GIB), memory_share=share)
    assert plan.layout == want, plan.reason
    assert ("within" if want == "fused" else "over" if node_gib else "unknown") in plan.reason
    if want == "fused":  # one replica type with every shard, embedding too
        assert plan.groups == [[0, 1, 2, 3]] and plan.embedder == plan.searcher
        assert plan.searcher.num_cpus == 1 and plan.searcher.threads == 4
    else:
        assert plan.groups == [[0], [1], [2], [3]] and plan.searcher.num_cpus == 0.5


def test_layout_given_is_kept_and_an_unknown_index_size_is_split():
    nodes = [NodeResources(cpus=8, memory=8 * GIB)]
    assert plan_serving(nodes, num_shards=2).layout == "split"  # index size unknown
    assert plan_serving(nodes, num_shards=2, layout="fused", index_bytes=100 * GIB).layout == "fused"
    assert plan_serving(nodes, num_shards=2, layout="split", index_bytes=1).layout == "split"
    assert "shards.layout = fused" in plan_serving(nodes, num_shards=2, layout="fused").reason


def test_fused_with_the_index_apart_adds_one_light_ingress_and_still_fits_a_laptop():
    from dataclasses import replace

    from serving.app import route_hops

    nodes = [NodeResources(cpus=2, memory=8 * GIB)]
    apart = plan_serving(nodes, num_shards=2, index_bytes=GIB // 10, searcher_replicas=2, fused_in_ingress=False)
    assert apart.layout == "fused" and not apart.fused_in_ingress and apart.groups == [[0, 1]]
    assert "IndexReplica replicas holding all 2 shard(s), behind one Ingress" in apart.reason
    assert apart.light.num_cpus > 0
    assert 2 * apart.searcher.num_cpus + apart.generator.num_cpus + apart.light.num_cpus <= 2
    assert "shards.fused_in_ingress = false" in apart.reason
    inside = plan_serving(nodes, num_shards=2, index_bytes=GIB // 10, searcher_replicas=2, fused_in_ingress=True)
    assert inside.fused_in_ingress and "Ingress replicas holding all 2 shard(s)" in inside.reason
    assert 2 * inside.searcher.num_cpus + inside.generator.num_cpus <= 2
    # auto: apart where another replica is left to retry on (2 or more, or autoscaling up to 2 or more)
    for replicas, most, want in [(1, None, True), (2, None, False), (1, 3, False)]:
        auto = plan_serving(nodes, num_shards=2, index_bytes=GIB // 10, searcher_replicas=replicas,
                            searcher_max_replicas=most)
        assert auto.fused_in_ingress is want and f"shards.fused_in_ingress auto: {most or replicas} replica(s)" \
            in auto.reason, auto.reason
    assert plan_serving(nodes, num_shards=2, layout="split", fused_in_ingress=False).layout == "split"
    assert route_hops(apart)["/v1/search"] == ("proxy -> Ingress -> IndexReplica (embed + 2 shard(s) + docstore) "
                                               "-> Ingress")
    assert route_hops(replace(apart, fused_in_ingress=True))["/v1/search"] == \
        "proxy -> Ingress (embed + 2 shard(s) + docstore, in process)"


def test_fused_replicas_scale_and_spread_like_a_shard_group_and_fit_a_laptop():
    laptop = plan_serving([NodeResources(cpus=2, memory=8 * GIB)], num_shards=2, index_bytes=GIB // 10)
    assert laptop.layout == "fused" and laptop.groups == [[0, 1]]
    # the Ingress holding the index and the Generator: 1 CPU each, no scaling down (no light replica beside)
    assert laptop.searcher.num_cpus == laptop.generator.num_cpus == 1.0
    assert laptop.searcher.threads == 2
    nodes = [NodeResources(cpus=8, gpus=2, memory=64 * GIB)] * 2
    plan = plan_serving(nodes, num_shards=8, groups=4, searcher_replicas=4, generator_replicas=2,
                        index_bytes=GIB, layout="auto")
    assert plan.layout == "fused" and plan.groups == [list(range(8))]  # shards.groups applies to split only
    assert plan.searcher.device == "gpu" and plan.searcher.num_gpus == 0.5  # 2 GPUs left for 4 replicas
    assert plan.searcher_max_per_node == 2  # 4 replicas over 2 nodes
    assert plan.generator.num_gpus == 1 and plan.embedder.device == "gpu"


@pytest.mark.parametrize("cpus, gpus, replicas", [(2, 0, 2), (2, 0, 5), (3, 0, 2), (4, 3, 3), (8, 3, 2), (16, 5, 6)])
def test_scaled_reservations_never_add_up_to_more_than_the_cluster_has(cpus, gpus, replicas):
    """Shares scaled to fit are rounded down: 2 fused replicas + the Generator on 2 CPUs asked 0.667 CPU each
    (2.001 in all), and Serve never started the second replica."""
    nodes = [NodeResources(cpus=cpus, gpus=gpus, memory=64 * GIB)]
    fused = plan_serving(nodes, num_shards=2, searcher_replicas=replicas, index_bytes=GIB // 10,
                         generator_device="cpu")
    assert fused.layout == "fused"
    assert replicas * fused.searcher.num_cpus + fused.generator.num_cpus <= cpus
    assert replicas * fused.searcher.num_gpus <= gpus
    split = plan_serving(nodes, num_shards=3, searcher_replicas=replicas, generator_device="cpu")
    used = (split.embedder.num_cpus + split.generator.num_cpus + 3 * replicas * split.searcher.num_cpus
            + 2 * split.light.num_cpus)
    assert used <= cpus and 3 * replicas * split.searcher.num_gpus <= gpus


@pytest.mark.parametrize("shards, want", [
    ({"layout": "split"}, {"embedder": 10, "searcher": 10, "generator": 10, "light": 0}),
    ({"layout": "fused", "fused_in_ingress": False}, {"embedder": 10, "searcher": 10, "generator": 10, "light": 0}),
    ({"layout": "fused", "fused_in_ingress": True}, {"embedder": 0, "searcher": 0, "generator": 10, "light": 0}),
])
def test_the_replicas_that_compute_are_planned_at_limits_compute_nice_and_the_ingress_never(monkeypatch, shards, want):
    """serving.app.plan_for: limits.compute_nice for the embedder, the index replicas and the generator; the light
    deployments (Ingress, Retriever) and an Ingress that holds the index itself keep Ray's priority; 0 = none."""
    import serving.app
    from configs.schema import ServeJobConfig

    fake = type("M", (), {"shards": [object()] * 2})()
    monkeypatch.setattr(serving.app, "resolve_index", lambda path: path)
    monkeypatch.setattr(serving.app, "read_index_manifest", lambda version: fake)
    laptop = [NodeResources(cpus=2, memory=16 * 2**30)]
    cfg = ServeJobConfig.model_validate({"index": {"path": "/nowhere"}, "generator": {"model": "tiny"},
                                         "shards": shards})
    plan = serving.app.plan_for(cfg, laptop)
    assert {role: getattr(plan, role).nice for role in want} == want, plan.reason
    off = serving.app.plan_for(cfg.model_copy(update={"limits": cfg.limits.model_copy(update={"compute_nice": 0})}),
                               laptop)
    assert {role: getattr(off, role).nice for role in want} == dict.fromkeys(want, 0)
