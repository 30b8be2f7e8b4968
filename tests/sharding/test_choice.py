"""`auto` across nodes: a more exact index spread over at most ``max_nodes`` nodes instead of a lossy PQ code on
one (sharding.choice.choose_index, plan_exact_nodes; docs/index.md "The automatic choice")."""

import math

import pytest

from configs.errors import RagtuneError
from sharding.choice import (
    IDMAP2_BYTES,
    NODE_HEADROOM,
    choose_index,
    estimate_bytes,
    nlist_for,
    node_plan,
    pq_sizes,
    quantizer_bytes,
)
from sharding.faiss_index import effective_factory

GiB = 2**30


def per_vector(kind: str, d: int, m: int = 0, refine: bool = False) -> int:
    """Bytes one more vector adds, from estimate_bytes (the single-node arithmetic), not from node_plan."""
    return estimate_bytes(kind, 2, d, nlist=16, m=m, refine=refine) - estimate_bytes(kind, 1, d, nlist=16, m=m,
                                                                                       refine=refine)


def assert_fits_nodes(c, nb: int, d: int, budget: int, max_nodes: int) -> None:
    """Every node's shards fit its usable memory; the shards hold every vector; the plan needs <= max_nodes."""
    assert 1 < c.nodes <= max_nodes and c.shards is not None and c.shards >= c.nodes
    nlist = nlist_for(nb)
    kind = "ivf_flat" if c.factory.endswith(",Flat") else "ivf_pq"
    m = 0 if kind == "ivf_flat" else int(c.factory.split(",PQ")[1].split("np")[0])
    refine = "Refine(SQ8)" in c.factory
    per = per_vector(kind, d, m, refine)
    fixed = quantizer_bytes(nlist, d) + (0 if kind == "ivf_flat" else 256 * 4 * d)
    shard_vectors = math.ceil(nb / c.shards)  # the largest shard
    per_node = math.ceil(c.shards / c.nodes)  # shards of the fullest node
    assert per_node * (shard_vectors * per + fixed) <= (1 - NODE_HEADROOM) * budget + per_node * per
    assert c.est_bytes == nb * per + c.shards * fixed  # every vector once, a quantizer copy per shard
    assert c.est_bytes / c.nodes <= budget


# --- 10M x 384 under 4 GiB (docs/scale.md: auto's IVF8192,PQ96np reached recall@10 0.65) -----------------------

def test_one_node_keeps_todays_lossy_choice_and_says_what_more_nodes_would_give():
    c = choose_index(10_000_000, 384, 4 * GiB, max_nodes=1)
    assert (c.factory, c.kind, c.nodes, c.shards) == ("IVF8192,PQ96np", "ivf_pq", 1, None)
    assert c == choose_index(10_000_000, 384, 4 * GiB)  # the default is one node
    assert c.est_bytes is not None and c.est_bytes <= 4 * GiB
    assert "recall may stay below the target" in c.reason
    assert ("across nodes IVF-PQ48 with SQ8 refinement would need 2 nodes of 4.0 GiB > index.max_nodes = 1 "
            "(allow 2" in c.reason)


@pytest.mark.parametrize("max_nodes", [2, 3, 8, 1000])
def test_enough_nodes_get_a_refined_plan_whose_shards_fit_every_node(max_nodes):
    nb, d, budget = 10_000_000, 384, 4 * GiB
    c = choose_index(nb, d, budget, max_nodes=max_nodes)
    assert (c.factory, c.kind) == ("IVF8192,PQ48np,Refine(SQ8)", "ivf_pq")
    assert (c.nodes, c.shards) == (2, 6)  # the fewest nodes: IVF-Flat (1544 B a vector) would need 5
    assert estimate_bytes("ivf_pq", nb, d, nlist=8192, m=48, refine=True) > budget  # not on one node
    assert_fits_nodes(c, nb, d, budget, max_nodes)
    assert c.train_size == 50 * 8192  # trained as on one node: 50 vectors per list
    assert (f"planned across at most index.max_nodes = {max_nodes} nodes: IVF-PQ48 with SQ8 refinement" in c.reason
            and "(IVF8192-Flat would need 5)" in c.reason)
    assert f"48 B PQ48x8 code + 8 B id + 384 B SQ8 refinement code + {IDMAP2_BYTES} B id map = 496 B" in c.reason
    assert "nodes = ceil(10,000,000 / 7,688,640 vectors per node) = 2, 6 shards" in c.reason
    effective_factory(c.factory, d, "inner_product")  # FAISS builds what the plan names


def test_too_few_nodes_for_the_exact_plan_fall_back_to_the_best_that_fits():
    # 40M x 384 at 4 GiB: the refined plan needs 6 nodes; IVF-PQ96 still fits one node
    nb, d, budget = 40_000_000, 384, 4 * GiB
    exact = choose_index(nb, d, budget, max_nodes=6)
    assert exact.factory == "IVF16384,PQ48np,Refine(SQ8)" and exact.nodes == 6
    assert_fits_nodes(exact, nb, d, budget, 6)
    c = choose_index(nb, d, budget, max_nodes=5)
    assert (c.factory, c.nodes, c.shards) == (choose_index(nb, d, budget).factory, 1, None)
    assert c.factory == "IVF16384,PQ96np" and c.est_bytes is not None and c.est_bytes <= budget
    assert "would need 6 nodes of 4.0 GiB > index.max_nodes = 5 (allow 6" in c.reason


def test_ivf_flat_across_nodes_where_it_needs_no_more_nodes_than_refinement():
    # d = 16: IVF-Flat is 72 B a vector, PQ4 + SQ8 refinement 84 B: the exact kind takes fewer nodes
    nb, d, budget = 100_000_000, 16, 4 * GiB
    assert choose_index(nb, d, budget).factory == "IVF32768,PQ8np"  # one node: the lossy code
    c = choose_index(nb, d, budget, max_nodes=4)
    assert (c.factory, c.kind, c.nodes) == ("IVF32768,Flat", "ivf_flat", 2)
    assert c.train_size == 50 * 32768 and "IVF-PQ4 with SQ8 refinement would need 3" in c.reason
    assert "per vector 16 x 4 B float + 8 B id = 72 B" in c.reason and "PQ codebooks" not in c.reason
    assert_fits_nodes(c, nb, d, budget, 4)
    effective_factory(c.factory, d, "l2")


# --- 1B chunks: rule 6 (nothing fits one node) --------------------------------------------------------------------

def test_a_billion_vectors_refined_when_the_cluster_allows_else_todays_pq_plan():
    nb, d, budget = 1_000_000_000, 384, 4 * GiB
    today = choose_index(nb, d, budget)
    assert (today.factory, today.nodes, today.shards) == ("IVF65536_HNSW32,PQ48np", 16, 48)
    for n in (1, 16, 141):  # too few for the refined plan: rule 6's lossy plan, with what more would give
        c = choose_index(nb, d, budget, max_nodes=n)
        assert (c.factory, c.nodes, c.shards, c.est_bytes) == (today.factory, 16, 48, today.est_bytes)
        assert f"would need 142 nodes of 4.0 GiB > index.max_nodes = {n}" in c.reason
    c = choose_index(nb, d, budget, max_nodes=142)
    assert (c.factory, c.nodes, c.shards) == ("IVF65536_HNSW32,PQ48np,Refine(SQ8)", 142, 425)
    assert "fit no single node" in c.reason and "(IVF65536-Flat would need 426)" in c.reason
    assert_fits_nodes(c, nb, d, budget, 142)
    plan = node_plan(nb, d, budget, 65536, 48, refine=True)
    assert plan is not None and (plan.nodes, plan.shards, plan.shards_per_node) == (142, 425, 3)
    assert plan.bytes_per_node <= (1 - NODE_HEADROOM) * budget
    assert plan.bytes_per_vector == per_vector("ivf_pq", d, 48, refine=True) == 496
    # smaller nodes: more of them, one shard each (the quantizer copies would take over a tenth of a node)
    small = choose_index(nb, d, GiB, max_nodes=4096)
    assert (small.factory, small.nodes, small.shards) == ("IVF65536_HNSW32,PQ48np,Refine(SQ8)", 586, 586)
    assert_fits_nodes(small, nb, d, GiB, 4096)


# --- invariants over a grid ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("nb", [200_000, 2_000_000, 20_000_000, 500_000_000])
@pytest.mark.parametrize("d", [384, 768, 100])
@pytest.mark.parametrize("budget", [64 * 2**20, GiB, 16 * GiB])
@pytest.mark.parametrize("use_gpu", [False, True])
def test_more_nodes_change_only_lossy_choices_and_every_plan_fits(nb, d, budget, use_gpu):
    try:
        one = choose_index(nb, d, budget, use_gpu=use_gpu)
    except RagtuneError:
        with pytest.raises(RagtuneError):
            choose_index(nb, d, budget, use_gpu=use_gpu, max_nodes=4096)
        return
    lossy = one.kind == "ivf_pq" and "Refine" not in one.factory
    for max_nodes in (2, 8, 64, 4096):
        c = choose_index(nb, d, budget, use_gpu=use_gpu, max_nodes=max_nodes)
        if not lossy:  # rules 1-4 fit one node: more nodes change nothing
            assert (c.factory, c.nodes, c.shards) == (one.factory, one.nodes, one.shards)
        elif c.factory != one.factory:  # a more exact kind across nodes
            assert c.kind == "ivf_flat" or "Refine(SQ8)" in c.factory
            assert 1 < c.nodes <= max_nodes and c.est_bytes is not None and c.est_bytes / c.nodes <= budget
            if use_gpu:
                assert "_HNSW" not in c.factory
        else:
            assert (c.nodes, c.shards) == (one.nodes, one.shards)
            if "index.max_nodes" not in c.reason:  # no exact plan at all: over MAX_SHARDS shards
                sizes = pq_sizes(d, use_gpu)
                m = next((s for s in sizes if d // s >= 8), sizes[-1])
                assert all(node_plan(nb, d, budget, nlist_for(nb), m, use_gpu=use_gpu, **kw) is None
                           for kw in ({"refine": True}, {"kind": "ivf_flat"}))
        fewer = choose_index(nb, d, budget, use_gpu=use_gpu, max_nodes=max_nodes // 2)
        if fewer.factory != one.factory:  # a plan chosen with fewer nodes allowed stays chosen with more
            assert (c.factory, c.nodes) == (fewer.factory, fewer.nodes)
