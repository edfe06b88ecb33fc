"""Whether an app fits a Ray cluster, as `pagoda serve` checks before it deploys: the arithmetic
(`capacity.check_capacity`, pure), the CPU-only default that lets two replicas and the ingress fit
two cores, and the CLI's choice between failing and warning (Ray's reading replaced by a fake)."""
from __future__ import annotations

import logging

import pytest

from pagoda.cluster import cli as cluster_cli
from pagoda.cluster.app import ClusterTuning
from pagoda.cluster.capacity import ClusterResources, app_demands, check_capacity, launches_nodes
from pagoda.cluster.config import CPU_WORKER_NUM_CPUS, GPU_WORKER_NUM_CPUS, ModelDeployment, parse_app_args
from pagoda.engine.entrypoints import cli as engine_cli

INGRESS_CPUS = ClusterTuning().ingress_num_cpus
TWO_CORES = ClusterResources(nodes=[{"CPU": 2.0}], available={"CPU": 2.0})


def _report(args, cluster=TWO_CORES):
    return check_capacity(app_demands(parse_app_args(args), INGRESS_CPUS), cluster)


def _flags(*argv: str, has_gpus: bool = False):
    args = engine_cli.build_parser().parse_args(["serve", *argv])
    args.model = args.model_positional or args.model
    return cluster_cli.app_args_from_flags(args, has_gpus)


def test_cpu_workers_default_to_half_a_core_and_gpu_workers_to_one():
    assert ModelDeployment(num_gpus_per_worker=0).num_cpus_per_worker == CPU_WORKER_NUM_CPUS == 0.5
    assert ModelDeployment().num_cpus_per_worker == GPU_WORKER_NUM_CPUS == 1.0
    assert ModelDeployment(num_gpus_per_worker=0, num_cpus_per_worker=2).num_cpus_per_worker == 2
    # the `serve run` shorthand passes strings
    assert parse_app_args({"num_gpus_per_worker": "0"}).models[0].num_cpus_per_worker == 0.5


def test_two_replicas_and_the_ingress_fit_two_cores_by_default():
    # `pagoda serve default --num-replicas 2` on a 2-core machine without GPUs
    report = _report(_flags("default", "--num-replicas", "2"))
    assert report.fits and report.warnings == ()
    # ... which a whole core per worker (the old default) did not
    report = _report(_flags("default", "--num-replicas", "2", "--num-cpus-per-worker", "1"))
    assert "3 CPU needed, the cluster has 2 CPU on 1 node" in report.unschedulable


def test_too_many_replicas_for_the_cluster_give_the_arithmetic_and_the_flags():
    report = _report(_flags("default", "--num-replicas", "3"))
    assert not report.fits
    assert report.unschedulable == ("3 replicas of model 'default' × 0.5 CPU = 1.5 + 1 replica of the ingress × "
                                    "1 CPU = 1: 2.5 CPU needed, the cluster has 2 CPU on 1 node")
    assert report.options_text(as_flags=True) == "--num-replicas, --num-cpus-per-worker or --ingress-replicas"
    assert report.options_text(as_flags=False) == "num_replicas, num_cpus_per_worker or ingress_replicas"


def test_ingress_replicas_and_every_model_count():
    report = _report({"models": [{"model": "a", "num_gpus_per_worker": 0},
                                 {"model": "b", "num_gpus_per_worker": 0, "tensor_parallel_size": 2}],
                      "ingress_replicas": 2}, ClusterResources([{"CPU": 4.0}], {"CPU": 4.0}))
    assert report.fits      # 0.5 + 2 × 0.5 + 2 × 1 = 3.5 <= 4
    report = _report({"models": [{"model": "a", "num_gpus_per_worker": 0},
                                 {"model": "b", "num_gpus_per_worker": 0, "tensor_parallel_size": 2}],
                      "ingress_replicas": 3}, ClusterResources([{"CPU": 4.0}], {"CPU": 4.0}))
    assert report.unschedulable == (
        "1 replica of model 'a' × 0.5 CPU = 0.5 + 1 replica of model 'b' × 2 workers × 0.5 CPU = 1 + "
        "3 replicas of the ingress × 1 CPU = 3: 4.5 CPU needed, the cluster has 4 CPU on 1 node")
    assert report.options_text(True) == ("--min-replicas, --num-cpus-per-worker, --tensor-parallel-size or "
                                         "--ingress-replicas")


def test_gpus_asked_of_a_cluster_without_any():
    report = _report(_flags("default", "--num-gpus-per-worker", "1"))
    assert report.unschedulable == ("one replica of model 'default' needs 1 CPU + 1 GPU on a single node, and the "
                                    "cluster has no GPU on 1 node")
    # more replicas would not help: only what each worker asks for
    assert report.options_text(True) == "--num-gpus-per-worker (0 runs on CPU)"


def test_a_tensor_parallel_replica_must_fit_one_node():
    two_small_nodes = ClusterResources([{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}], {"CPU": 16.0, "GPU": 2.0})
    report = _report({"model": "m", "tensor_parallel_size": 2}, two_small_nodes)
    assert report.unschedulable == (
        "one replica of model 'm' needs 2 workers × (1 CPU + 1 GPU) = 2 CPU + 2 GPU on a single node, and no node "
        "has that (the largest has 1 GPU; the cluster has 2 GPU on 2 nodes)")
    assert report.options_text(False) == "num_gpus_per_worker (0 runs on CPU) or tensor_parallel_size"
    one_big_node = ClusterResources([{"CPU": 8.0, "GPU": 2.0}], {"CPU": 8.0, "GPU": 2.0})
    assert _report({"model": "m", "tensor_parallel_size": 2}, one_big_node).fits
    # Two one-GPU replicas do fit two one-GPU nodes.
    assert _report({"model": "m", "num_replicas": 2}, two_small_nodes).fits


def test_replicas_within_the_totals_must_still_pack_onto_the_nodes():
    # 3 × 1 CPU = 3 <= 1.5 + 1.5, but a node holds only one such replica
    nodes = ClusterResources([{"CPU": 1.5}, {"CPU": 1.5}], {"CPU": 3.0})
    report = check_capacity(app_demands(parse_app_args({"model": "m", "num_replicas": 2, "num_gpus_per_worker": 0,
                                                        "num_cpus_per_worker": 1}), 1.0), nodes)
    assert report.unschedulable == ("the replicas fit the cluster's totals but not its nodes: 1 replica(s) of the "
                                    "ingress find no node with room left (the nodes: 1.5 CPU; 1.5 CPU)")
    # half-core replicas pack beside the ingress
    assert _report({"model": "m", "num_replicas": 2, "num_gpus_per_worker": 0}, nodes).fits


def test_an_autoscaled_model_needs_its_floor_and_warns_about_its_ceiling():
    # min_replicas=0 still needs one replica to answer a request
    report = _report({"model": "m", "min_replicas": 0, "max_replicas": 4, "num_gpus_per_worker": 0,
                      "num_cpus_per_worker": 2})
    assert report.unschedulable.startswith("1 replica of model 'm' × 2 CPU = 2 + 1 replica of the ingress")
    assert report.options_text(True) == "--min-replicas, --num-cpus-per-worker or --ingress-replicas"
    report = _report({"model": "m", "min_replicas": 1, "max_replicas": 4, "num_gpus_per_worker": 0})
    assert report.fits
    assert report.warnings == (("model 'm' may scale to max_replicas=4 (4 replicas of model 'm' × 0.5 CPU = 2, "
                                "3 CPU with the rest of the app), more than the cluster's 2 CPU on 1 node: the "
                                "replicas beyond that never start"),)


def test_resources_others_hold_only_warn():
    busy = ClusterResources([{"CPU": 2.0}], {"CPU": 0.5})
    report = _report(_flags("default"), busy)
    assert report.fits
    assert report.warnings == (("the app needs 1.5 CPU and the cluster has 2, but others hold 1.5 right now: "
                                "replicas that do not fit wait until they release them"),)


def _fake_cluster(monkeypatch, cluster: ClusterResources) -> list[bool]:
    asked = []

    def read(wait_for_nodes: bool) -> ClusterResources:
        asked.append(wait_for_nodes)
        return ClusterResources(cluster.nodes, cluster.available, cluster.can_add_nodes or wait_for_nodes)

    monkeypatch.setattr(cluster_cli, "read_cluster_resources", read)
    return asked


def test_the_cli_fails_on_a_fixed_cluster_naming_the_flags(monkeypatch):
    _fake_cluster(monkeypatch, TWO_CORES)
    config = parse_app_args(_flags("default", "--num-replicas", "3"))
    with pytest.raises(ValueError) as excinfo:
        cluster_cli._check_capacity(config, INGRESS_CPUS, "pagoda", wait_for_nodes=False, as_flags=True)
    message = str(excinfo.value)
    assert message.startswith("application 'pagoda' cannot be scheduled on this Ray cluster: 3 replicas")
    assert "2.5 CPU needed, the cluster has 2 CPU on 1 node" in message
    assert "change --num-replicas, --num-cpus-per-worker or --ingress-replicas" in message
    assert "--wait-for-nodes" in message
    # a --config file names its keys instead of flags
    with pytest.raises(ValueError, match="change num_replicas, num_cpus_per_worker or ingress_replicas"):
        cluster_cli._check_capacity(config, INGRESS_CPUS, "pagoda", wait_for_nodes=False, as_flags=False)
    cluster_cli._check_capacity(parse_app_args(_flags("default", "--num-replicas", "2")), INGRESS_CPUS, "pagoda",
                                wait_for_nodes=False, as_flags=True)


@pytest.mark.parametrize("autoscaler", [True, False])
def test_the_cli_only_warns_where_nodes_can_join(monkeypatch, caplog, autoscaler):
    asked = _fake_cluster(monkeypatch, ClusterResources(TWO_CORES.nodes, TWO_CORES.available, can_add_nodes=autoscaler))
    config = parse_app_args(_flags("default", "--num-replicas", "3"))
    with caplog.at_level(logging.WARNING, logger="pagoda.cluster"):
        cluster_cli._check_capacity(config, INGRESS_CPUS, "pagoda", wait_for_nodes=not autoscaler, as_flags=True)
    assert asked == [not autoscaler]
    assert "2.5 CPU needed" in caplog.text and "waiting for nodes to join" in caplog.text


def test_only_an_autoscaler_with_node_types_of_its_own_adds_nodes():
    # `ray start` / `ray.init()`: Ray's autoscaler runs read-only, one type per node
    assert not launches_nodes({"node_7c4d11b799a950ded760205467aafe047d31474e2baec1cd2f66680e"})
    assert not launches_nodes(set()) and not launches_nodes({""})
    # `ray up` node types, a KubeRay worker group
    assert launches_nodes({"ray.head.default", "ray.worker.gpu"}) and launches_nodes({"headgroup", "gpu-group"})
