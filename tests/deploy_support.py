"""What the deployment tests share: docker compose files read the way Docker Compose reads them
(`${VAR:-default}` interpolation, `!reset` / `!override` tags, override-file merging), the
Kubernetes manifests rendered by `kubectl kustomize` (or a standalone `kustomize build`), and the
service CLIs' argument parsers.

No Docker engine or cluster is needed: compose files are checked against the compose-spec JSON
schema (vendored by the check-jsonschema package), manifests with kubernetes-validate, and the
commands with the services' own argparse parsers. Rendering is offline: kustomize only reads k8s/.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_CPU_FILE = ROOT / "docker-compose.cpu.yml"
K8S = ROOT / "k8s"
K8S_OVERLAYS = {"cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu"}

# The module each container command runs -> the function that builds its argparse parser.
PARSERS = {
    "services.executor": "services.executor.server:build_parser",
    "services.scheduler": "services.scheduler.server:build_parser",
    "services.tokenizer": "services.tokenizer.server:build_parser",
    "gateway": "gateway.__main__:build_parser",
    "services.cli": "services.cli:build_parser",
}
# The gRPC service each compose service / k8s component serves (health service names).
GRPC_SERVICE_NAMES = {"executor": "pagedserve.v1.Executor", "scheduler": "pagedserve.v1.Scheduler",
                      "tokenizer": "pagedserve.v1.Tokenizer"}


# ---------------------------------------------------------------------------- compose: YAML tags
class Reset:
    """`!reset`: the key goes back to its default (removed) when files are merged."""

    def __init__(self, value: Any) -> None:
        self.value = value


class Override:
    """`!override`: the value replaces the base file's instead of merging with it."""

    def __init__(self, value: Any) -> None:
        self.value = value


class _ComposeLoader(yaml.SafeLoader):
    pass


def _tag(cls):
    def construct(loader: yaml.SafeLoader, node: yaml.Node):
        if isinstance(node, yaml.MappingNode):
            return cls(loader.construct_mapping(node, deep=True))
        if isinstance(node, yaml.SequenceNode):
            return cls(loader.construct_sequence(node, deep=True))
        return cls(loader.construct_scalar(node) or None)
    return construct


_ComposeLoader.add_constructor("!reset", _tag(Reset))
_ComposeLoader.add_constructor("!override", _tag(Override))


# ---------------------------------------------------------------------------- compose: interpolation
_VAR = re.compile(r"\$(?:\$|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}|"
                  r"(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate_str(s: str, env: dict[str, str]) -> str:
    """Compose's interpolation: $$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?e}, ${VAR?e}, ${VAR:+a}, ${VAR+a}."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("braced") or m.group("plain")
        op, arg = m.group("op"), m.group("arg") or ""
        value = env.get(name)
        if op in (":-", "-"):
            return value if (value if op == ":-" else value is not None) else interpolate_str(arg, env)
        if op in (":?", "?"):
            if (not value) if op == ":?" else value is None:
                raise ValueError(f"required variable {name} is missing a value: {arg}")
            return value
        if op in (":+", "+"):
            return interpolate_str(arg, env) if (value if op == ":+" else value is not None) else ""
        return value or ""

    return _VAR.sub(sub, s)


def interpolated_variables(doc: Any) -> set[str]:
    """Every variable name a compose document interpolates."""
    out: set[str] = set()

    def walk(x: Any) -> None:
        if isinstance(x, (Reset, Override)):
            walk(x.value)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, str):
            for m in _VAR.finditer(x):
                if m.group(0) != "$$":
                    out.add(m.group("braced") or m.group("plain"))

    walk(doc)
    return out


def _interpolate(x: Any, env: dict[str, str]) -> Any:
    if isinstance(x, Reset):
        return Reset(_interpolate(x.value, env))
    if isinstance(x, Override):
        return Override(_interpolate(x.value, env))
    if isinstance(x, dict):
        return {k: _interpolate(v, env) for k, v in x.items()}
    if isinstance(x, list):
        return [_interpolate(v, env) for v in x]
    if isinstance(x, str):
        return interpolate_str(x, env)
    return x


# ---------------------------------------------------------------------------- compose: load + merge
def load_compose_raw(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)


def strip_tags(x: Any) -> Any:
    """One file on its own: `!reset` keys dropped, `!override` values unwrapped."""
    if isinstance(x, Override):
        return strip_tags(x.value)
    if isinstance(x, dict):
        return {k: strip_tags(v) for k, v in x.items() if not isinstance(v, Reset)}
    if isinstance(x, list):
        return [strip_tags(v) for v in x if not isinstance(v, Reset)]
    return x


_REPLACED_SEQUENCES = {"command", "entrypoint", "test"}


def _merge(base: Any, over: Any, key: str | None = None) -> Any:
    if isinstance(over, Override):
        return strip_tags(over.value)
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            if isinstance(v, Reset):
                out.pop(k, None)
            elif k in out:
                out[k] = _merge(out[k], v, k)
            else:
                out[k] = strip_tags(v)
        return out
    if isinstance(base, list) and isinstance(over, list) and key not in _REPLACED_SEQUENCES:
        return base + [v for v in strip_tags(over) if v not in base]
    return strip_tags(over)


def _normalize(doc: dict) -> dict:
    """environment lists -> mappings (KEY=VALUE, bare KEY -> None), as compose does before merging."""
    for svc in (doc.get("services") or {}).values():
        env = svc.get("environment")
        if isinstance(env, list):
            svc["environment"] = {e.split("=", 1)[0]: (e.split("=", 1)[1] if "=" in e else None) for e in env}
    return doc


def load_compose(files: list[Path], env: dict[str, str] | None = None) -> dict:
    """The compose model of `docker compose -f A -f B ... config`, interpolated with `env`."""
    env = {} if env is None else env
    model: dict = {}
    for f in files:
        doc = _normalize(_interpolate(load_compose_raw(f), env))
        model = strip_tags(doc) if not model else _merge(model, doc)
    return model


def compose_schema() -> dict:
    """The compose-spec JSON schema that the check-jsonschema package vendors (schema of the
    compose-spec project, Apache-2.0)."""
    from importlib.resources import files

    return json.loads((files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())


def validate_compose(doc: dict) -> None:
    import jsonschema

    schema = compose_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    errors = sorted(cls(schema).iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        raise AssertionError("compose schema: " + "; ".join(
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10]))


def pagedserve_services(model: dict) -> dict[str, dict]:
    """Services that run the pagedserve image (not the monitoring profile's third-party images)."""
    return {n: s for n, s in model["services"].items() if "pagedserve" in str(s.get("image", ""))}


def default_services(model: dict) -> dict[str, dict]:
    """Services `docker compose up` starts without --profile."""
    return {n: s for n, s in model["services"].items() if not s.get("profiles")}


def healthcheck_argv(svc: dict) -> list[str]:
    test = svc["healthcheck"]["test"]
    if isinstance(test, str):
        return ["sh", "-c", test]
    if test[0] == "CMD":
        return list(test[1:])
    if test[0] == "CMD-SHELL":
        return ["sh", "-c", " ".join(test[1:])]
    raise ValueError(f"unsupported healthcheck test {test!r}")


def duration_s(value: str | float | None, default: float) -> float:
    """Compose durations: 1h2m3s4ms / 10s / 1.5s."""
    if value is None:
        return default
    if isinstance(value, (int, float)):
        return float(value)
    total = 0.0
    for num, unit in re.findall(r"([\d.]+)(us|ms|s|m|h)", value):
        total += float(num) * {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}[unit]
    return total


# ---------------------------------------------------------------------------- commands -> parsers
def module_argv(argv: list[str]) -> tuple[str, list[str]]:
    """(module, its arguments) for a container command: `python -m MOD ...` or `pagedserve ...`."""
    if argv[0] in ("python", "python3") and argv[1] == "-m":
        return argv[2], list(argv[3:])
    if argv[0] == "pagedserve":
        return "services.cli", list(argv[1:])
    raise ValueError(f"not a pagedserve command: {argv!r}")


def parser_for(module: str) -> argparse.ArgumentParser:
    mod, fn = PARSERS[module].split(":")
    return getattr(importlib.import_module(mod), fn)()


def option_strings(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Every --flag the parser (or the subcommand argv selects) accepts: what its --help lists."""
    flags: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub = next((a for a in argv if a in action.choices), None)
            if sub is not None:
                flags |= option_strings(action.choices[sub], argv)
        if action.help != argparse.SUPPRESS:  # hidden flags are not part of the interface
            flags.update(action.option_strings)
    return flags


def parse_command(argv: list[str]) -> tuple[str, argparse.Namespace, set[str]]:
    """Parse a container command with its service's own parser; raises AssertionError naming any
    flag the CLI does not have or a value it rejects."""
    module, args = module_argv(argv)
    parser = parser_for(module)
    known = option_strings(parser, args)
    unknown = [a.split("=", 1)[0] for a in args if a.startswith("--") and a.split("=", 1)[0] not in known]
    assert not unknown, f"{module}: flags not in its --help: {unknown}"
    try:
        ns = parser.parse_args(args)
    except SystemExit as e:
        raise AssertionError(f"{module} rejects {args!r} (exit {e.code})") from None
    return module, ns, known


def flag_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


# ---------------------------------------------------------------------------- kubernetes
def kustomize_command() -> list[str] | None:
    """The kustomize that renders k8s/: the one built into kubectl (what `kubectl apply -k` deploys
    with, so the tests check exactly that output), else a standalone kustomize binary; None if
    neither is on PATH."""
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


def render_k8s(path: Path) -> list[dict]:
    """The resources of a kustomization directory; skips the calling test without a kustomize."""
    cmd = kustomize_command()
    if cmd is None:
        pytest.skip("rendering k8s/ needs `kubectl` or `kustomize` on PATH; neither was found")
    out = subprocess.run([*cmd, str(path)], check=False, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} {path} failed: {out.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def validate_k8s(overlay: str, resources: list[dict], versions: list[str]) -> None:
    """Every rendered resource validates strictly (unknown fields fail) for each Kubernetes version,
    and lives in the pagedserve namespace."""
    import kubernetes_validate

    for r in resources:
        for version in versions:
            try:
                kubernetes_validate.validate(r, version, strict=True)
            except Exception as e:  # noqa: BLE001 - report which manifest
                raise AssertionError(f"{overlay}: {r['kind']}/{r['metadata']['name']} (k8s {version}): "
                                     f"{str(e)[:400]}") from None
        assert r["kind"] == "Namespace" or r["metadata"]["namespace"] == "pagedserve"


def pod_spec(res: dict) -> dict | None:
    if res["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return res["spec"]["template"]["spec"]
    return None


_K8S_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def container_env(container: dict, configmaps: dict[str, dict]) -> dict[str, str | None]:
    """The variables kubelet defines for a container (envFrom ConfigMaps, then env; None for
    values it reads from elsewhere: Secrets, resource fields)."""
    env: dict[str, str | None] = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            env.update(configmaps[src["configMapRef"]["name"]].get("data", {}))
    for e in container.get("env", []):
        env[e["name"]] = e.get("value")
    return env


def expand_k8s_args(argv: list[str], env: dict[str, str | None]) -> list[str]:
    """kubelet's $(VAR) expansion of command/args; an undefined variable is an error here (kubelet
    would pass the literal text on)."""
    def sub(m: re.Match) -> str:
        name = m.group(1)
        assert name in env and env[name] is not None, f"$({name}) is not defined by the container's env"
        return env[name]
    return [_K8S_VAR.sub(sub, a) for a in argv]


def k8s_vars(argv: list[str]) -> set[str]:
    return {m.group(1) for a in argv for m in _K8S_VAR.finditer(a)}


def source_reads_env(name: str) -> bool:
    """Does the project's own code read this environment variable?"""
    for pkg in ("services", "gateway", "engine_core"):
        for f in (ROOT / pkg).rglob("*.py"):
            if f.name.endswith("_pb2.py") or f.name.endswith("_pb2_grpc.py"):
                continue
            text = f.read_text(errors="replace")
            if re.search(rf"""(environ|getenv)[^\n]*["']{re.escape(name)}["']""", text):
                return True
    return False


def deepcopy(x: Any) -> Any:
    return copy.deepcopy(x)
