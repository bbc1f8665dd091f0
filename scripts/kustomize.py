#!/usr/bin/env python3
"""A small `kustomize build` for the features k8s/ uses, for machines without kubectl/kustomize
(and as a second opinion in tests, which compare it with `kubectl kustomize` where that exists).

    python scripts/kustomize.py k8s/overlays/cpu > pagedserve-cpu.yaml

Supported kustomization fields: `resources` (files and directories, recursively), `patches`
(strategic-merge patches and JSON 6902 patches, from `path` or inline `patch`, with an optional
`target`), `patchesStrategicMerge`, `patchesJson6902`, `namespace`, `images`, `commonLabels`
(metadata labels only). Anything else is an error rather than silently ignored.

Strategic merge follows Kubernetes' patch strategies for the lists this project patches:
containers / initContainers / volumes / env merge by `name`, volumeMounts by
`mountPath`, ports by `containerPort`; every other list is replaced; a null value deletes a key.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED = {"apiVersion", "kind", "resources", "patches", "patchesStrategicMerge", "patchesJson6902",
             "namespace", "images", "commonLabels"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume",
                  "StorageClass", "PriorityClass", "IngressClass", "RuntimeClass", "APIService",
                  "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"}
# Strategic-merge list keys (k8s.io/api patchMergeKey) for the list fields we may patch.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "ephemeralContainers": "name", "volumes": "name",
              "env": "name", "volumeMounts": "mountPath", "volumeDevices": "devicePath", "ports": "containerPort",
              "imagePullSecrets": "name", "hostAliases": "ip"}
POD_TEMPLATE_PATHS = {  # kind -> path to the PodSpec
    "Pod": ("spec",), "Deployment": ("spec", "template", "spec"), "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"), "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"), "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}


class KustomizeError(ValueError):
    pass


# ---------------------------------------------------------------------------- strategic merge
def strategic_merge(base: Any, patch: Any, field: str | None = None) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = strategic_merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS \
            and all(isinstance(x, dict) for x in base + patch):
        key = MERGE_KEYS[field]
        out, new = list(base), []
        for item in patch:
            idx = next((i for i, b in enumerate(out) if b.get(key) == item.get(key)), None)
            if idx is None:
                new.append(copy.deepcopy(item))
            else:
                out[idx] = strategic_merge(out[idx], item, None)
        return new + out  # kustomize puts the patch's new items first
    return copy.deepcopy(patch)


# ---------------------------------------------------------------------------- JSON 6902
def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer must start with '/': {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str]) -> Any:
    for p in parts:
        doc = doc[int(p)] if isinstance(doc, list) else doc[p]
    return doc


def json6902(doc: Any, ops: list[dict]) -> Any:
    doc = copy.deepcopy(doc)
    for op in ops:
        kind, parts = op["op"], _pointer(op["path"])
        parent, last = _walk(doc, parts[:-1]), parts[-1]
        if kind == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(op["value"]))
            else:
                parent[last] = copy.deepcopy(op["value"])
        elif kind == "replace":
            if isinstance(parent, list):
                parent[int(last)] = copy.deepcopy(op["value"])
            else:
                if last not in parent:
                    raise KustomizeError(f"replace: no {op['path']}")
                parent[last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del parent[int(last) if isinstance(parent, list) else last]
        elif kind == "test":
            if _walk(doc, parts) != op["value"]:
                raise KustomizeError(f"test failed at {op['path']}")
        else:
            raise KustomizeError(f"unsupported JSON patch op {kind!r}")
    return doc


# ---------------------------------------------------------------------------- build
def _group_version(api_version: str) -> tuple[str, str]:
    return tuple(api_version.split("/", 1)) if "/" in api_version else ("", api_version)  # type: ignore[return-value]


def _matches(res: dict, target: dict) -> bool:
    group, version = _group_version(res.get("apiVersion", ""))
    meta = res.get("metadata", {})
    checks = {"kind": res.get("kind"), "name": meta.get("name"), "namespace": meta.get("namespace"),
              "group": group, "version": version}
    for k, want in target.items():
        if k in ("labelSelector", "annotationSelector"):
            raise KustomizeError(f"patch target {k} is not supported")
        if k in checks and checks[k] != want:
            return False
    return True


def _load_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def _apply_patch(resources: list[dict], patch_text: str, target: dict | None, where: str) -> None:
    docs = _load_docs(patch_text)
    if len(docs) == 1 and isinstance(docs[0], list):  # JSON 6902
        if not target:
            raise KustomizeError(f"{where}: a JSON 6902 patch needs a target")
        hits = [i for i, r in enumerate(resources) if _matches(r, target)]
        if not hits:
            raise KustomizeError(f"{where}: no resource matches {target}")
        for i in hits:
            resources[i] = json6902(resources[i], docs[0])
        return
    for patch in docs:  # strategic merge: targets from the patch itself unless `target` is given
        t = target or {"kind": patch.get("kind"), "name": patch.get("metadata", {}).get("name")}
        hits = [i for i, r in enumerate(resources) if _matches(r, t)]
        if not hits:
            raise KustomizeError(f"{where}: no resource matches {t}")
        for i in hits:
            body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind")}
            if target:  # a targeted patch does not rename what it hits
                body.setdefault("metadata", {}).pop("name", None)
            resources[i] = strategic_merge(resources[i], body)


def _set_image(image: str, rules: list[dict]) -> str:
    if "@" in image:
        name = image.split("@", 1)[0]
    else:
        slash = image.rfind("/")
        colon = image.rfind(":")
        name = image[:colon] if colon > slash else image
    for rule in rules:
        if rule.get("name") == name:
            new = rule.get("newName", name)
            if "digest" in rule:
                return f"{new}@{rule['digest']}"
            tag = rule.get("newTag")
            if tag is None:
                rest = image[len(name):]
                return new + rest
            return f"{new}:{tag}"
    return image


def build(path: str | Path) -> list[dict]:
    path = Path(path)
    kfile = next((path / f for f in KUSTOMIZATION_FILES if (path / f).exists()), None)
    if kfile is None:
        raise KustomizeError(f"no kustomization file in {path}")
    kust = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(kust) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{kfile}: unsupported fields {sorted(unknown)}")

    resources: list[dict] = []
    for entry in kust.get("resources", []):
        p = path / entry
        if p.is_dir():
            resources += build(p)
        elif p.is_file():
            resources += _load_docs(p.read_text())
        else:
            raise KustomizeError(f"{kfile}: resource {entry} not found (remote resources are not supported)")

    for entry in kust.get("patchesStrategicMerge", []):
        _apply_patch(resources, (path / entry).read_text(), None, f"{kfile}: {entry}")
    for entry in kust.get("patchesJson6902", []):
        text = (path / entry["path"]).read_text() if "path" in entry else entry["patch"]
        _apply_patch(resources, text, entry["target"], f"{kfile}: patchesJson6902")
    for entry in kust.get("patches", []):
        text = (path / entry["path"]).read_text() if "path" in entry else entry["patch"]
        _apply_patch(resources, text, entry.get("target"), f"{kfile}: {entry.get('path', 'inline patch')}")

    if "namespace" in kust:
        for r in resources:
            if r.get("kind") not in CLUSTER_SCOPED:
                r.setdefault("metadata", {})["namespace"] = kust["namespace"]
    if "commonLabels" in kust:
        for r in resources:
            r.setdefault("metadata", {}).setdefault("labels", {}).update(kust["commonLabels"])
    if "images" in kust:
        for r in resources:
            spec_path = POD_TEMPLATE_PATHS.get(r.get("kind"))
            if spec_path is None:
                continue
            try:
                spec = _walk(r, list(spec_path))
            except (KeyError, IndexError, TypeError):
                continue
            for field in ("initContainers", "containers"):
                for c in spec.get(field, []):
                    c["image"] = _set_image(c["image"], kust["images"])
    return resources


def render(path: str | Path) -> str:
    return yaml.safe_dump_all(build(path), sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        sys.stdout.write(render(argv[0]))
    except (KustomizeError, OSError, yaml.YAMLError) as e:
        print(f"kustomize.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
