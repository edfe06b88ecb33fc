"""Will the app's replicas fit the Ray cluster? The arithmetic `pagoda serve` checks before it deploys.

Ray places an actor only where a node has the resources it reserves, and Serve waits (without an
error) for as long as a replica cannot be placed. On a cluster that no autoscaler grows, a deployment
larger than the cluster therefore waits forever; this module says so up front, with the numbers:

    one model replica   tensor_parallel_size workers × {CPU: num_cpus_per_worker, GPU: num_gpus_per_worker},
                        all on one node (TP > 1: one STRICT_PACK placement group; TP = 1: the replica actor)
    one ingress replica {CPU: ingress_num_cpus}
    Serve's controller and HTTP proxies reserve no CPU or GPU (Ray Serve creates them with num_cpus=0)

    needed = Σ models initial_replicas × per replica + ingress_replicas × per ingress replica

Checks, in order (the first that fails is the reason the app cannot be placed):

    1. every replica fits on one node by itself            (else: no node is big enough)
    2. needed ≤ the cluster's total, per resource           (else: the cluster is too small)
    3. the replicas pack onto the nodes (first-fit decreasing)  (else: too fragmented)

and two that only warn: the resources free right now (other applications hold some: replicas wait
until those are released), and an autoscaled model's max_replicas beyond what the cluster holds.

The checks are pure functions of a `ClusterResources`; `read_cluster_resources` is the one place that
asks Ray (`ray.nodes()`, `ray.available_resources()`, the autoscaler's state), imported there.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .config import AppConfig

SCHEDULED_RESOURCES = ("CPU", "GPU")
# Ray books resources in units of 1/10000; anything smaller is rounding.
_EPSILON = 1e-4


@dataclass(frozen=True)
class Demand:
    """`replicas` copies of one deployment, each reserving `workers` × `per_worker` on a single node."""

    what: str                                  # "model 'default'" or "the ingress"
    replicas: int                              # that must be placed for the app to serve
    max_replicas: int                          # that an autoscaled model may grow to (= replicas if fixed)
    workers: int                               # resource-holding actors per replica (tensor_parallel_size)
    per_worker: Mapping[str, float]            # e.g. {"CPU": 0.5, "GPU": 0.0}
    replicas_option: str                       # the option that sets `replicas`, e.g. "num_replicas"
    resource_options: Mapping[str, str] = field(default_factory=dict)   # resource -> option that sets it

    @property
    def per_replica(self) -> dict[str, float]:
        return {resource: self.workers * self.per_worker.get(resource, 0.0) for resource in SCHEDULED_RESOURCES}

    def total(self, resource: str, replicas: int | None = None) -> float:
        return (self.replicas if replicas is None else replicas) * self.per_replica[resource]

    def explain(self, resource: str, replicas: int | None = None) -> str:
        """'2 replicas of model 'x' × 2 workers × 0.5 CPU = 2 CPU'."""
        count = self.replicas if replicas is None else replicas
        workers = f" × {self.workers} workers" if self.workers > 1 else ""
        return (f"{count} {'replica' if count == 1 else 'replicas'} of {self.what}{workers} × "
                f"{_number(self.per_worker.get(resource, 0.0))} {resource} = {_number(self.total(resource, count))}")


@dataclass(frozen=True)
class ClusterResources:
    """What the Ray cluster has: each live node's total resources, and what is free right now."""

    nodes: Sequence[Mapping[str, float]]
    available: Mapping[str, float]
    can_add_nodes: bool = False
    """An autoscaler can add nodes: a deployment that does not fit waits for them instead of failing."""

    def total(self, resource: str) -> float:
        return sum(node.get(resource, 0.0) for node in self.nodes)

    def describe(self, resource: str) -> str:
        """'2 CPU on 1 node', 'no GPU on 3 nodes'."""
        count, total = len(self.nodes), self.total(resource)
        return f"{_number(total) if total else 'no'} {resource} on {count} {'node' if count == 1 else 'nodes'}"


@dataclass(frozen=True)
class CapacityReport:
    """The verdict: `unschedulable` says why the app can never be placed as the cluster is (None: it
    fits) and `options` which app options would shrink it; `warnings` say what fits only later or in part."""

    unschedulable: str | None
    options: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def fits(self) -> bool:
        return self.unschedulable is None

    def options_text(self, as_flags: bool) -> str:
        """'--num-replicas, --num-cpus-per-worker or --ingress-replicas' (as_flags), else the app-arg names."""
        names = [("--" + option.replace("_", "-")) if as_flags else option for option in self.options]
        names = [f"{name} (0 runs on CPU)" if "gpus" in name else name for name in names]
        return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)


def app_demands(config: AppConfig, ingress_num_cpus: float) -> list[Demand]:
    """What each deployment of the app reserves (mirrors `app.replica_options` and the ingress options)."""
    demands = []
    for model in config.models:
        demands.append(Demand(
            what=f"model {model.name!r}", replicas=model.initial_replicas, max_replicas=model.most_replicas,
            workers=model.tensor_parallel_size,
            per_worker={"CPU": model.num_cpus_per_worker, "GPU": model.num_gpus_per_worker},
            replicas_option="num_replicas" if model.num_replicas is not None else "min_replicas",
            resource_options={"CPU": "num_cpus_per_worker", "GPU": "num_gpus_per_worker"}))
    demands.append(Demand(what="the ingress", replicas=config.ingress_replicas, max_replicas=config.ingress_replicas,
                          workers=1, per_worker={"CPU": ingress_num_cpus}, replicas_option="ingress_replicas"))
    return demands


def check_capacity(demands: Sequence[Demand], cluster: ClusterResources) -> CapacityReport:
    """Whether `demands` can be placed on `cluster` (see the module docstring for the checks).

    Invariant: `unschedulable` is None only if every replica fits a node, the totals fit the cluster
    and a first-fit-decreasing packing places every replica; `warnings` never block a deploy.
    """
    for check in (_too_big_for_any_node, _too_big_for_the_cluster, _does_not_pack):
        found = check(demands, cluster)
        if found is not None:
            reason, short, with_counts = found
            return CapacityReport(reason, _options_for(demands, short, with_counts))
    return CapacityReport(None, (), tuple(_busy_now(demands, cluster)) + tuple(_ceilings_out_of_reach(demands, cluster)))


def _options_for(demands: Sequence[Demand], resources: Sequence[str], with_counts: bool) -> tuple[str, ...]:
    """The options that shrink what `demands` reserve of `resources`: the models' replica counts (if
    `with_counts`), what each worker reserves, tensor parallelism, then the ingress replicas."""
    involved = [demand for demand in demands if any(demand.per_replica[r] > 0 for r in resources)]
    models = [demand for demand in involved if demand.resource_options]
    options = [demand.replicas_option for demand in models] if with_counts else []
    options += [demand.resource_options[r] for demand in models for r in resources if r in demand.resource_options]
    options += ["tensor_parallel_size" for demand in models if demand.workers > 1]
    if with_counts:
        options += [demand.replicas_option for demand in involved if not demand.resource_options]
    return tuple(dict.fromkeys(options))


# -- the checks ------------------------------------------------------------------------------------
# (why it cannot be placed, the resources that are short, whether fewer replicas would help)
_Finding = tuple[str, list[str], bool] | None


def _too_big_for_any_node(demands: Sequence[Demand], cluster: ClusterResources) -> _Finding:
    for demand in demands:
        need = demand.per_replica
        if demand.replicas == 0 or any(_fits(need, node) for node in cluster.nodes):
            continue
        largest = {resource: max((node.get(resource, 0.0) for node in cluster.nodes), default=0.0)
                   for resource in SCHEDULED_RESOURCES}
        short = [resource for resource in SCHEDULED_RESOURCES if need[resource] > largest[resource] + _EPSILON]
        if not short:      # each resource fits some node, but no node has all of them
            short = [resource for resource in SCHEDULED_RESOURCES if need[resource] > 0]
        workers = f"{demand.workers} workers × " if demand.workers > 1 else ""
        parts = " + ".join(f"{_number(need[r])} {r}" for r in SCHEDULED_RESOURCES if need[r] > 0)
        per_worker = " + ".join(f"{_number(demand.per_worker.get(r, 0.0))} {r}" for r in SCHEDULED_RESOURCES
                                if need[r] > 0)
        arithmetic = f"{workers}({per_worker}) = {parts}" if workers else parts
        if all(cluster.total(r) == 0 for r in short):
            where = f"the cluster has {' and '.join(cluster.describe(r) for r in short)}"
        else:
            largest_node = " + ".join(f"{_number(largest[r])} {r}" for r in short)
            where = (f"no node has that (the largest has {largest_node}; the cluster has "
                     f"{', '.join(cluster.describe(r) for r in short)})")
        return f"one replica of {demand.what} needs {arithmetic} on a single node, and {where}", short, False
    return None


def _too_big_for_the_cluster(demands: Sequence[Demand], cluster: ClusterResources) -> _Finding:
    lines, short = [], []
    for resource in SCHEDULED_RESOURCES:
        needed = sum(demand.total(resource) for demand in demands)
        if needed <= cluster.total(resource) + _EPSILON:
            continue
        terms = " + ".join(demand.explain(resource) for demand in demands if demand.total(resource) > 0)
        lines.append(f"{terms}: {_number(needed)} {resource} needed, the cluster has {cluster.describe(resource)}")
        short.append(resource)
    return ("; ".join(lines), short, True) if lines else None


def _does_not_pack(demands: Sequence[Demand], cluster: ClusterResources) -> _Finding:
    unplaced = _first_fit_decreasing([(d, d.per_replica) for d in demands for _ in range(d.replicas)],
                                     cluster.nodes)
    if not unplaced:
        return None
    what = sorted({demand.what for demand in unplaced})
    short = [r for r in SCHEDULED_RESOURCES if any(demand.per_replica[r] > 0 for demand in unplaced)]
    nodes = "; ".join(" + ".join(f"{_number(node.get(r, 0.0))} {r}" for r in short) for node in cluster.nodes)
    why = (f"the replicas fit the cluster's totals but not its nodes: {len(unplaced)} replica(s) of "
           f"{', '.join(what)} find no node with room left (the nodes: {nodes})")
    return why, short, True


def _busy_now(demands: Sequence[Demand], cluster: ClusterResources) -> list[str]:
    warnings = []
    for resource in SCHEDULED_RESOURCES:
        needed = sum(demand.total(resource) for demand in demands)
        free = cluster.available.get(resource, 0.0)
        if needed > free + _EPSILON:
            held = cluster.total(resource) - free
            warnings.append(f"the app needs {_number(needed)} {resource} and the cluster has "
                            f"{_number(cluster.total(resource))}, but others hold {_number(held)} right now: "
                            "replicas that do not fit wait until they release them")
    return warnings


def _ceilings_out_of_reach(demands: Sequence[Demand], cluster: ClusterResources) -> list[str]:
    warnings = []
    for demand in demands:
        if demand.max_replicas <= demand.replicas:
            continue
        for resource in SCHEDULED_RESOURCES:
            others = sum(d.total(resource) for d in demands if d is not demand)
            at_most = demand.total(resource, demand.max_replicas) + others
            if at_most > cluster.total(resource) + _EPSILON and not cluster.can_add_nodes:
                warnings.append(f"{demand.what} may scale to max_replicas={demand.max_replicas} "
                                f"({demand.explain(resource, demand.max_replicas)}, {_number(at_most)} {resource} "
                                f"with the rest of the app), more than the cluster's "
                                f"{cluster.describe(resource)}: the replicas beyond that never start")
                break
    return warnings


def _first_fit_decreasing(items: list[tuple[Demand, dict[str, float]]],
                          nodes: Sequence[Mapping[str, float]]) -> list[Demand]:
    """Places the largest items first, each on the first node with room; returns what found none."""
    room = [{resource: node.get(resource, 0.0) for resource in SCHEDULED_RESOURCES} for node in nodes]
    unplaced = []
    for demand, need in sorted(items, key=lambda item: tuple(-item[1][r] for r in reversed(SCHEDULED_RESOURCES))):
        for node in room:
            if _fits(need, node):
                for resource in SCHEDULED_RESOURCES:
                    node[resource] -= need[resource]
                break
        else:
            unplaced.append(demand)
    return unplaced


def _fits(need: Mapping[str, float], node: Mapping[str, float]) -> bool:
    return all(need.get(resource, 0.0) <= node.get(resource, 0.0) + _EPSILON for resource in SCHEDULED_RESOURCES)


def _number(value: float) -> str:
    """2.0 -> '2', 0.5 -> '0.5', 1/3 -> '0.3333'."""
    return f"{value:.4f}".rstrip("0").rstrip(".") if value != int(value) else str(int(value))


# -- reading Ray -----------------------------------------------------------------------------------
def read_cluster_resources(wait_for_nodes: bool) -> ClusterResources:
    """The connected Ray cluster's live nodes, what is free now, and whether nodes may join
    (`wait_for_nodes`: the user says so; else Ray's autoscaler must manage node types of its own)."""
    import ray

    nodes = [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]
    return ClusterResources(nodes, dict(ray.available_resources()),
                            can_add_nodes=wait_for_nodes or _autoscaler_adds_nodes())


def _autoscaler_adds_nodes() -> bool:
    """Whether Ray's autoscaler launches nodes for this cluster (see `launches_nodes`)."""
    import json

    import ray
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        status = json.loads(_internal_kv_get("__autoscaling_status") or b"{}")
        node_types = set(((status.get("autoscaler_report") or {}).get("node_type_mapping") or {}).values())
        if not node_types:      # autoscaler v2 (KubeRay) reports its nodes through the GCS instead
            from ray.autoscaler.v2.sdk import get_cluster_status

            cluster_status = get_cluster_status(ray.get_runtime_context().gcs_address)
            node_types = {node.ray_node_type_name for node in cluster_status.active_nodes}
    except Exception:  # noqa: BLE001 - no readable autoscaler state: treat the cluster as fixed
        return False
    return launches_nodes(node_types)


def launches_nodes(node_types: Iterable[str]) -> bool:
    """Ray's autoscaler runs on every head node, but on a fixed cluster (`ray start`, `ray.init()`)
    only read-only, with one node type per node named `node_<node id>`; `ray up` and KubeRay
    autoscaling name the types of their config ("ray.worker.gpu", a worker group)."""
    return any(node_type and not node_type.startswith("node_") for node_type in node_types)
