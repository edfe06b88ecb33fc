"""RayExecutorInCore: what a TP>1 replica hands its core process so that the core can join Ray and
drive the worker actors (the end-to-end run through Serve is in test_cluster_bench's smoke)."""
from __future__ import annotations

import pickle

import pytest


def test_it_carries_the_actors_cluster_placement_group_and_runtime_env(ray_cluster):
    ray = pytest.importorskip("ray")
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from pagoda.cluster.ray_executor import RayExecutorInCore

    @ray.remote(num_cpus=0)
    class Replica:
        def factory(self) -> bytes:
            return pickle.dumps(RayExecutorInCore.here())      # it travels to the core process pickled

    group = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_PACK")
    ray.get(group.ready(), timeout=60)
    try:
        replica = Replica.options(
            runtime_env={"env_vars": {"PAGODA_TEST_MARK": "tp-workers-see-it"}},
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=group)).remote()
        factory = pickle.loads(ray.get(replica.factory.remote(), timeout=60))
        assert factory.gcs_address == ray_cluster["address"]
        assert factory.group is not None and factory.group.id == group.id
        assert factory.runtime_env["env_vars"] == {"PAGODA_TEST_MARK": "tp-workers-see-it"}
        ray.kill(replica)
    finally:
        remove_placement_group(group)
