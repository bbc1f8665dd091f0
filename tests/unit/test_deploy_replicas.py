"""The scale-out manifests (issue 18), checked like the base ones (tests/unit/test_deploy_manifests.py)
without a cluster: k8s/overlays/replicas-{cpu,gpu} render with kustomize and validate strictly; the
singleton scheduler and executor are replaced by one `pagedserve-replica` Deployment whose pods run
both (the scheduler dialing its executor on loopback), every container command parses with its
service's CLI, the gateways discover the replicas through a headless Service (`--scheduler-dns`),
the GPU goes to the executor container only, and the replica pods accept the gateway and
Prometheus only. The docker compose `replicas` profile is checked in test_deploy_manifests.py's
compose tests and here."""
from __future__ import annotations

import pytest

from tests.deploy_support import (
    COMPOSE_CPU_FILE,
    COMPOSE_FILE,
    K8S,
    container_env,
    expand_k8s_args,
    load_compose,
    parse_command,
    pod_spec,
    render_k8s,
    validate_compose,
    validate_k8s,
)

OVERLAYS = {"replicas-cpu": K8S / "overlays" / "replicas-cpu", "replicas-gpu": K8S / "overlays" / "replicas-gpu"}
K8S_VERSIONS = ["1.29.0", "1.33.0"]
MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render_k8s(path) for name, path in OVERLAYS.items()}


def _by(res: list[dict], kind: str) -> dict[str, dict]:
    return {r["metadata"]["name"]: r for r in res if r["kind"] == kind}


def _argv(c: dict, configmaps: dict) -> list[str]:
    return expand_k8s_args(c["command"] + c["args"], container_env(c, configmaps))


def test_replica_overlays_validate(rendered):
    for overlay, resources in rendered.items():
        validate_k8s(overlay, resources, K8S_VERSIONS)
        names = {(r["kind"], r["metadata"]["name"]) for r in resources}
        for kind in ("Deployment", "Service", "NetworkPolicy"):  # the singletons are gone
            assert (kind, "pagedserve-scheduler") not in names and (kind, "pagedserve-executor") not in names
        assert set(_by(resources, "Deployment")) == {"pagedserve-gateway", "pagedserve-tokenizer", "pagedserve-replica"}


def test_replica_pod_runs_a_scheduler_and_its_executor(rendered):
    for overlay, resources in rendered.items():
        cms = _by(resources, "ConfigMap")
        dep = _by(resources, "Deployment")["pagedserve-replica"]
        assert dep["spec"]["replicas"] >= 2 and dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
        containers = {c["name"]: c for c in pod_spec(dep)["containers"]}
        assert set(containers) == {"scheduler", "executor"}
        smod, sns, _ = parse_command(_argv(containers["scheduler"], cms))
        emod, ens, _ = parse_command(_argv(containers["executor"], cms))
        assert (smod, emod) == ("services.scheduler", "services.executor")
        assert sns.executor_address == f"127.0.0.1:{ens.port}"  # its own executor, on the pod's loopback
        assert sns.host == "0.0.0.0" and (sns.metrics_port, ens.metrics_port) == (9051, 9053)
        for flag in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size"):
            assert getattr(sns, flag) == getattr(ens, flag), (overlay, flag)
        ports = [p["containerPort"] for c in containers.values() for p in c["ports"]]
        assert len(ports) == len(set(ports)), "containers of one pod share its ports"
        assert containers["scheduler"]["readinessProbe"]["grpc"] == {"port": sns.port,
                                                                    "service": "pagedserve.v1.Scheduler"}
        assert containers["executor"]["readinessProbe"]["grpc"]["port"] == ens.port
        gpus = {n: c["resources"]["limits"].get("nvidia.com/gpu") for n, c in containers.items()}
        assert gpus == ({"scheduler": None, "executor": "1"} if overlay == "replicas-gpu"
                        else {"scheduler": None, "executor": None})
        assert ens.device == ("cuda" if overlay == "replicas-gpu" else "cpu")
        if overlay == "replicas-cpu":
            assert ens.kv_cache_memory_gb == 1.0
        spec = pod_spec(dep)
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in containers.values():
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert all("emptyDir" in volumes[mounts[p]] for p in ("/tmp", "/home/app/.cache"))
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]) and {"cpu", "memory"} <= set(c["resources"]["requests"])


def test_gateways_discover_the_replicas_through_a_headless_service(rendered):
    for overlay, resources in rendered.items():
        cms = _by(resources, "ConfigMap")
        (gw,) = pod_spec(_by(resources, "Deployment")["pagedserve-gateway"])["containers"]
        module, ns, _ = parse_command(_argv(gw, cms))
        assert module == "gateway" and ns.scheduler_dns == "pagedserve-replica:50051", overlay
        svc = _by(resources, "Service")["pagedserve-replica"]
        assert svc["spec"]["clusterIP"] == "None" and svc["spec"].get("publishNotReadyAddresses") is False
        dep = _by(resources, "Deployment")["pagedserve-replica"]
        assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        named = {p["name"]: p["containerPort"] for c in pod_spec(dep)["containers"] for p in c["ports"]}
        grpc = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc")
        assert grpc["port"] == 50051 and named[grpc["targetPort"]] == 50051
        assert all(p["targetPort"] in named for p in svc["spec"]["ports"])
        # the HPA scales the gateways; the replicas scale on their own (no HPA fights `replicas`)
        (hpa,) = _by(resources, "HorizontalPodAutoscaler").values()
        assert hpa["spec"]["scaleTargetRef"]["name"] == "pagedserve-gateway"


def test_replica_network_policy_and_pdb(rendered):
    for resources in rendered.values():
        pol = _by(resources, "NetworkPolicy")["pagedserve-replica"]
        assert pol["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "replica"
        rules = pol["spec"]["ingress"]
        serving = [r for r in rules if [p["port"] for p in r["ports"]] == [50051]]
        assert serving and serving[0]["from"] == [{"podSelector": {"matchLabels": {
            "app.kubernetes.io/name": "pagedserve", "app.kubernetes.io/component": "gateway"}}}]
        metrics = [r for r in rules if r is not serving[0]]
        assert metrics and all(r["from"] == [MONITORING] for r in metrics)
        assert sorted(p["port"] for r in metrics for p in r["ports"]) == [9051, 9053]  # never 50053
        pdb = _by(resources, "PodDisruptionBudget")["pagedserve-replica"]
        deps = [d for d in _by(resources, "Deployment").values()
                if pdb["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert [d["metadata"]["name"] for d in deps] == ["pagedserve-replica"]
        assert pdb["spec"]["maxUnavailable"] == 1


def test_compose_replicas_profile():
    for files in ([COMPOSE_FILE], [COMPOSE_FILE, COMPOSE_CPU_FILE]):
        model = load_compose(files)
        validate_compose(model)
        prof = {n: s for n, s in model["services"].items() if s.get("profiles") == ["replicas"]}
        assert set(prof) == {"executor-2", "scheduler-2", "gateway-replicas"}
        _, ex2, _ = parse_command(prof["executor-2"]["command"])
        _, sc2, _ = parse_command(prof["scheduler-2"]["command"])
        _, gw, _ = parse_command(prof["gateway-replicas"]["command"])
        _, ex1, _ = parse_command(model["services"]["executor"]["command"])
        assert sc2.executor_address == f"executor-2:{ex2.port}"
        assert gw.scheduler_address == "scheduler:50051,scheduler-2:50051" and gw.routing == "prefix"
        assert ex2.device == ex1.device and ex2.model == ex1.model
        assert set(prof["gateway-replicas"]["depends_on"]) == {"scheduler", "scheduler-2", "tokenizer"}
        assert prof["gateway-replicas"]["ports"] == ["127.0.0.1:8001:8000"]
        if files[-1] == COMPOSE_CPU_FILE:
            assert ex2.kv_cache_memory_gb == ex1.kv_cache_memory_gb
        else:
            devices = prof["executor-2"]["deploy"]["resources"]["reservations"]["devices"]
            assert devices == [{"driver": "nvidia", "device_ids": ["1"], "capabilities": ["gpu"]}]
