import pytest

from cluster.placement import NodeResources, plan_embed_actors
from configs.errors import RagtuneError


def test_laptop_gets_one_single_thread_actor_per_core_and_leaves_a_cpu_for_reads():
    plan = plan_embed_actors([NodeResources(cpus=2)])
    assert (plan.actors, plan.threads, plan.num_cpus, plan.num_gpus, plan.device) == (2, 1, 0.5, 0, "cpu")
    assert plan_embed_actors([NodeResources(cpus=16)]).threads == 4
    assert plan.fp16 is False and plan.batch_size == 64


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 8, 16, 64])
@pytest.mark.parametrize("n_nodes", [1, 3])
def test_cpu_plans_always_leave_a_cpu_free_on_every_node(cpus, n_nodes):
    nodes = [NodeResources(cpus=cpus)] * n_nodes
    plan = plan_embed_actors(nodes)
    per_node = plan.actors // n_nodes
    assert per_node >= 1 and plan.actors % n_nodes == 0
    assert per_node * plan.num_cpus <= cpus - 0.5  # reads and chunking can always be scheduled
    assert per_node * plan.threads <= max(cpus, plan.threads)


def test_gpu_cluster_gets_one_fp16_actor_per_gpu():
    nodes = [NodeResources(cpus=8), NodeResources(cpus=32, gpus=4), NodeResources(cpus=32, gpus=4)]
    plan = plan_embed_actors(nodes)
    assert (plan.actors, plan.num_gpus, plan.device, plan.fp16, plan.batch_size) == (8, 1, "cuda", True, 256)
    assert plan_embed_actors(nodes, device="cpu").device == "cpu"
    assert plan_embed_actors(nodes, fp16=False).fp16 is False


def test_hardware_mismatches_fail_early_with_the_setting_named():
    with pytest.raises(RagtuneError, match="embed.device = 'gpu' but the Ray cluster has no GPUs"):
        plan_embed_actors([NodeResources(cpus=4)], device="gpu")
    with pytest.raises(RagtuneError, match="embed.actors = 3 GPU actors but the cluster has 2 GPUs"):
        plan_embed_actors([NodeResources(cpus=8, gpus=2)], actors=3)
    with pytest.raises(RagtuneError, match=r"embed.actors = 5 .* Fix: set embed.actors <= 2"):
        plan_embed_actors([NodeResources(cpus=4)], actors=5, threads=2)
    with pytest.raises(RagtuneError, match="embed.fp16 = true needs GPU actors"):
        plan_embed_actors([NodeResources(cpus=4)], fp16=True)
    with pytest.raises(RagtuneError, match="no alive node"):
        plan_embed_actors([])


def test_explicit_choices_are_kept():
    plan = plan_embed_actors([NodeResources(cpus=16)], threads=4, actors=2, batch_size=16)
    assert (plan.actors, plan.threads, plan.num_cpus, plan.batch_size) == (2, 4, 4, 16)


# --- ragtune index ------------------------------------------------------------------------------------------------

def test_index_tasks_on_a_laptop_split_the_cores_between_shards():
    from cluster.placement import plan_index_tasks

    one = plan_index_tasks([NodeResources(cpus=2)], shards=1)
    assert (one.use_gpu, one.num_gpus, one.num_cpus, one.threads, one.train_threads, one.concurrent) == \
        (False, 0, 2, 2, 2, 1)
    four = plan_index_tasks([NodeResources(cpus=2)], shards=4)
    assert (four.num_cpus, four.threads, four.concurrent) == (1, 1, 2)


@pytest.mark.parametrize("cpus", [1, 2, 8, 64])
@pytest.mark.parametrize("n_nodes", [1, 3])
@pytest.mark.parametrize("shards", [1, 2, 5, 16, 100])
def test_index_tasks_never_ask_for_more_threads_than_a_node_has(cpus, n_nodes, shards):
    from cluster.placement import plan_index_tasks

    plan = plan_index_tasks([NodeResources(cpus=cpus)] * n_nodes, shards)
    assert plan.num_gpus == 0 and plan.num_cpus == plan.threads >= 1
    per_node = -(-plan.concurrent // n_nodes)
    assert per_node * plan.threads <= cpus and 1 <= plan.concurrent <= shards


def test_index_tasks_take_one_gpu_each_when_the_cluster_has_gpus():
    from cluster.placement import plan_index_tasks

    nodes = [NodeResources(cpus=8), NodeResources(cpus=32, gpus=4)]
    plan = plan_index_tasks(nodes, shards=6)
    assert (plan.use_gpu, plan.num_gpus, plan.num_cpus, plan.concurrent) == (True, 1, 1, 4)
    assert plan_index_tasks(nodes, shards=6, device="cpu").use_gpu is False
    with pytest.raises(RagtuneError, match=r"index.device = 'gpu' but the Ray cluster has no GPUs"):
        plan_index_tasks([NodeResources(cpus=4)], shards=1, device="gpu")


def test_index_tasks_declare_memory_and_run_no_more_at_once_than_a_node_holds():
    from cluster.placement import plan_index_tasks

    GiB = 2**30
    nodes = [NodeResources(cpus=8, memory=10 * GiB)] * 2
    cores_only = plan_index_tasks(nodes, shards=16)
    assert (cores_only.concurrent, cores_only.threads, cores_only.memory) == (16, 1, 0)
    plan = plan_index_tasks(nodes, shards=16, task_memory=3 * GiB)  # 3 tasks of 3 GiB fit 10 GiB
    assert (plan.concurrent, plan.threads, plan.num_cpus, plan.memory) == (6, 2, 2, 3 * GiB)
    assert "memory=3.00 GiB each, 3 per node in 10.0 GiB" in plan.reason
    assert plan_index_tasks(nodes, shards=1, task_memory=3 * GiB).concurrent == 1
    gpu = plan_index_tasks([NodeResources(cpus=32, gpus=4, memory=10 * GiB)], shards=8, task_memory=4 * GiB)
    assert (gpu.use_gpu, gpu.concurrent) == (True, 2)  # 4 GPUs, but memory for 2 tasks
    with pytest.raises(RagtuneError, match=r"a shard task needs about 12.0 GiB .* 10.0 GiB .* Fix: set index.shards"):
        plan_index_tasks(nodes, shards=2, task_memory=12 * GiB)
    assert plan_index_tasks([NodeResources(cpus=2)], shards=2, task_memory=12 * GiB).memory == 12 * GiB  # unknown
