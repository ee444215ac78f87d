#!/usr/bin/env python3
"""Offline checks of the GitOps example manifests in gitops/argocd and gitops/flux.

    check_manifests.py REPO_ROOT GITOPS_DIR CORE_FILES.txt

GITOPS_DIR is REPO_ROOT/gitops, or a copy of it; the paths the manifests name (the chart, the
directory of peers) are looked up in REPO_ROOT.

Argo CD's and Flux's kinds have no schema offline, so this checks what they need and what the
README promises: apiVersion, kind and the required fields of each, the paths they name exist in
this repository, the chart values they pass validate against charts/wgpin/values.schema.json,
the Argo CD health checks in argocd-cm equal the .lua files, and the settings gitops/README.md
relies on (server-side apply, the namespace and its Pod Security label, Flux's health checks,
CRDs following the chart). The files that hold objects of core kinds (Namespace, ConfigMap), and
only those, are listed in CORE_FILES.txt for kubernetes-validate. Exits 1 with every problem
listed.

Needs PyYAML and jsonschema (both in the project's venv, .tools/venv).
"""

import json
import sys
from pathlib import Path

import jsonschema
import yaml

NAMESPACE = "wgpin-system"
CHART = "charts/wgpin"
WGPIN_KINDS = {"PinnedInterface", "PinnedPeer"}  # what users write; PinnedNodeState is wgpin's
PSA_LABEL = "pod-security.kubernetes.io/enforce"
CRD_POLICIES = {"Skip", "Create", "CreateReplace"}


class JsonLoader(yaml.SafeLoader):
    """YAML as Kubernetes reads it: no timestamps (they stay strings)."""


JsonLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def merge(defaults, overrides):
    """Helm's coalescing: maps merge key by key, anything else replaces, null removes."""
    out = dict(defaults)
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


class Checker:
    def __init__(self, root, gitops):
        self.root = root
        self.gitops = gitops
        self.problems = []
        self.values_schema = json.loads((root / CHART / "values.schema.json").read_text(encoding="utf-8"))
        self.default_values = yaml.load((root / CHART / "values.yaml").read_text(encoding="utf-8"), Loader=JsonLoader)
        self.git_repositories = set()
        self.summary = []

    def fail(self, where, message):
        self.problems.append(f"{where}: {message}")

    def get(self, where, obj, path, kind=None):
        """obj at a dotted path; a problem (and None) when it is missing or of the wrong type."""
        value = obj
        for part in path.split("."):
            if not isinstance(value, dict) or part not in value:
                self.fail(where, f"{path} is missing")
                return None
            value = value[part]
        if kind is not None and not isinstance(value, kind):
            self.fail(where, f"{path} is a {type(value).__name__}, not a {kind.__name__}")
            return None
        return value

    def repo_dir(self, where, path, field):
        if not isinstance(path, str):
            return None
        directory = (self.root / path.removeprefix("./")).resolve()
        if self.root.resolve() not in directory.parents and directory != self.root.resolve():
            self.fail(where, f"{field} {path!r} leaves the repository")
            return None
        if not directory.is_dir():
            self.fail(where, f"{field} {path!r} is not a directory of this repository")
            return None
        return directory

    def wgpin_objects_only(self, where, directory, recursive):
        """The directory a tool applies holds only objects users write (what Flux's generated
        kustomization or Argo CD's directory source would apply)."""
        files = sorted(directory.rglob("*") if recursive else directory.glob("*"))
        files = [f for f in files if f.suffix in (".yaml", ".yml", ".json") and f.is_file()]
        if not files:
            self.fail(where, f"{directory.relative_to(self.root)} holds no manifests")
        for path in files:
            for doc in yaml.load_all(path.read_text(encoding="utf-8"), Loader=JsonLoader):
                if doc is None:
                    continue
                if doc.get("apiVersion") != "wgpin.io/v1alpha1" or doc.get("kind") not in WGPIN_KINDS:
                    self.fail(
                        where,
                        f"{path.relative_to(self.root)} holds {doc.get('apiVersion')}/{doc.get('kind')}: "
                        "the directory would apply more than PinnedInterfaces and PinnedPeers",
                    )

    def values(self, where, values, field):
        """Helm validates the schema against the chart's defaults with the overrides merged in."""
        if values is None:
            return
        if not isinstance(values, dict):
            self.fail(where, f"{field} is not a map")
            return
        merged = merge(self.default_values, values)
        for error in jsonschema.Draft7Validator(self.values_schema).iter_errors(merged):
            self.fail(where, f"{field}: {'/'.join(str(p) for p in error.absolute_path)}: {error.message}")

    # --- Argo CD ---------------------------------------------------------------------------

    def application(self, where, obj):
        self.get(where, obj, "metadata.namespace", str)
        self.get(where, obj, "spec.project", str)
        source = self.get(where, obj, "spec.source", dict) or {}
        for field in ("repoURL", "targetRevision", "path"):
            self.get(where, source, field, str)
        destination = self.get(where, obj, "spec.destination", dict) or {}
        if not (destination.get("server") or destination.get("name")):
            self.fail(where, "spec.destination needs server or name")
        options = self.get(where, obj, "spec.syncPolicy.syncOptions", list) or []
        if "ServerSideApply=true" not in options:
            self.fail(where, "spec.syncPolicy.syncOptions lacks ServerSideApply=true")
        directory = self.repo_dir(where, source.get("path"), "spec.source.path")
        if directory is None:
            return
        if source.get("path") == CHART:
            if not (directory / "Chart.yaml").is_file():
                self.fail(where, f"{CHART}/Chart.yaml is missing")
            if destination.get("namespace") != NAMESPACE:
                self.fail(where, f"spec.destination.namespace is {destination.get('namespace')!r}, not {NAMESPACE}")
            if "CreateNamespace=true" not in options:
                self.fail(where, "spec.syncPolicy.syncOptions lacks CreateNamespace=true")
            labels = self.get(where, obj, "spec.syncPolicy.managedNamespaceMetadata.labels", dict) or {}
            if labels.get(PSA_LABEL) != "privileged":
                self.fail(where, f"managedNamespaceMetadata.labels lacks {PSA_LABEL}: privileged")
            helm = source.get("helm") or {}
            if "values" in helm:
                self.fail(where, "spec.source.helm.values is a string: use valuesObject so it can be checked")
            self.values(where, helm.get("valuesObject"), "spec.source.helm.valuesObject")
            self.summary.append(f"Argo CD Application {obj['metadata']['name']}: chart {CHART}")
        else:
            recurse = (source.get("directory") or {}).get("recurse", False)
            self.wgpin_objects_only(where, directory, recurse)
            self.summary.append(f"Argo CD Application {obj['metadata']['name']}: {source.get('path')}/")

    def argocd_cm(self, where, obj):
        data = self.get(where, obj, "data", dict) or {}
        health = {k: v for k, v in data.items() if k.startswith("resource.customizations.health.")}
        if "resource.exclusions" in data:
            exclusions = yaml.load(data["resource.exclusions"], Loader=JsonLoader)
            if not any(
                "wgpin.io" in (e.get("apiGroups") or []) and "PinnedNodeState" in (e.get("kinds") or [])
                for e in exclusions or []
            ):
                self.fail(where, "resource.exclusions does not exclude wgpin.io PinnedNodeState")
            self.summary.append("argocd-cm: resource.exclusions for PinnedNodeState")
        if not health and "resource.exclusions" not in data:
            self.fail(where, "an argocd-cm with neither health checks nor exclusions")
        lua_dir = self.gitops / "argocd-health"
        wanted = {
            f"resource.customizations.health.{p.parent.parent.name}_{p.parent.name}": p
            for p in sorted(lua_dir.glob("*/*/health.lua"))
        }
        if health:
            for key in sorted(set(health) | set(wanted)):
                if key not in health:
                    self.fail(where, f"{key} is missing ({wanted[key]} exists)")
                elif key not in wanted:
                    self.fail(where, f"{key} has no health.lua under gitops/argocd-health")
                elif health[key] != wanted[key].read_text(encoding="utf-8"):
                    self.fail(where, f"{key} differs from {wanted[key]}")
            self.summary.append(f"argocd-cm: {len(health)} health checks equal to their .lua files")

    # --- Flux ------------------------------------------------------------------------------

    def git_repository(self, where, obj):
        self.get(where, obj, "spec.url", str)
        self.get(where, obj, "spec.interval", str)
        ref = self.get(where, obj, "spec.ref", dict) or {}
        if not any(ref.get(k) for k in ("branch", "tag", "semver", "name", "commit")):
            self.fail(where, "spec.ref needs branch, tag, semver, name or commit")
        self.git_repositories.add((obj["metadata"].get("namespace"), obj["metadata"]["name"]))
        self.summary.append(f"Flux GitRepository {obj['metadata']['name']}")

    def source_ref(self, where, obj, path, own_namespace):
        ref = self.get(where, obj, path, dict) or {}
        key = (ref.get("namespace", own_namespace), ref.get("name"))
        if ref.get("kind") != "GitRepository" or key not in self.git_repositories:
            self.fail(where, f"{path} names no GitRepository defined in gitops/flux ({ref})")

    def helm_release(self, where, obj):
        self.get(where, obj, "spec.interval", str)
        chart = self.get(where, obj, "spec.chart.spec.chart", str)
        directory = self.repo_dir(where, chart, "spec.chart.spec.chart")
        if directory is not None and chart.removeprefix("./") != CHART:
            self.fail(where, f"spec.chart.spec.chart is {chart!r}, not ./{CHART}")
        self.source_ref(where, obj, "spec.chart.spec.sourceRef", obj["metadata"].get("namespace"))
        if self.get(where, obj, "spec.targetNamespace", str) != NAMESPACE:
            self.fail(where, f"spec.targetNamespace is not {NAMESPACE}")
        for phase in ("install", "upgrade"):
            policy = (obj["spec"].get(phase) or {}).get("crds")
            if policy not in CRD_POLICIES:
                self.fail(where, f"spec.{phase}.crds is {policy!r}, not one of {sorted(CRD_POLICIES)}")
            elif policy != "CreateReplace":
                self.fail(where, f"spec.{phase}.crds is {policy}: the CRDs would not follow the chart")
        self.values(where, obj["spec"].get("values"), "spec.values")
        self.summary.append(f"Flux HelmRelease {obj['metadata']['name']}: ./{CHART} into {NAMESPACE}")

    def kustomization(self, where, obj):
        self.get(where, obj, "spec.interval", str)
        if not isinstance(obj.get("spec", {}).get("prune"), bool):
            self.fail(where, "spec.prune (required in kustomize.toolkit.fluxcd.io/v1) is missing")
        self.source_ref(where, obj, "spec.sourceRef", obj["metadata"].get("namespace"))
        path = self.get(where, obj, "spec.path", str)
        directory = self.repo_dir(where, path, "spec.path")
        if directory is not None:
            # Without a kustomization.yaml, Flux generates one over the whole directory tree.
            self.wgpin_objects_only(where, directory, recursive=True)
        if obj["spec"].get("wait") is not True:
            self.fail(where, "spec.wait is not true: the peers' health would not be checked")
        exprs = obj["spec"].get("healthCheckExprs") or []
        peer_exprs = [e for e in exprs if e.get("apiVersion") == "wgpin.io/v1alpha1" and e.get("kind") == "PinnedPeer"]
        if len(peer_exprs) != 1:
            self.fail(where, "spec.healthCheckExprs needs one entry for wgpin.io/v1alpha1 PinnedPeer")
        for number, expr in enumerate(exprs):
            if not isinstance(expr.get("current"), str) or not expr["current"].strip():
                self.fail(where, f"spec.healthCheckExprs[{number}].current is required")
            for field in ("current", "failed", "inProgress"):
                text = expr.get(field)
                if text is not None and text.count("(") != text.count(")"):
                    self.fail(where, f"spec.healthCheckExprs[{number}].{field}: unbalanced parentheses")
        for expr in peer_exprs:
            if "'Ready'" not in expr.get("current", "") or "'Stalled'" not in expr.get("failed", ""):
                self.fail(where, "the PinnedPeer health check must wait for Ready and fail on Stalled")
        self.summary.append(f"Flux Kustomization {obj['metadata']['name']}: {path}")

    # --- core kinds --------------------------------------------------------------------------

    def namespace(self, where, obj):
        if obj["metadata"]["name"] != NAMESPACE:
            self.fail(where, f"Namespace {obj['metadata']['name']} is not {NAMESPACE}")
        if (obj["metadata"].get("labels") or {}).get(PSA_LABEL) != "privileged":
            self.fail(where, f"Namespace lacks the label {PSA_LABEL}: privileged")
        self.summary.append(f"Namespace {NAMESPACE} ({PSA_LABEL}=privileged)")

    def run(self, core_out):
        kinds = {
            ("argoproj.io/v1alpha1", "Application"): self.application,
            ("source.toolkit.fluxcd.io/v1", "GitRepository"): self.git_repository,
            ("helm.toolkit.fluxcd.io/v2", "HelmRelease"): self.helm_release,
            ("kustomize.toolkit.fluxcd.io/v1", "Kustomization"): self.kustomization,
            ("v1", "Namespace"): self.namespace,
            ("v1", "ConfigMap"): self.argocd_cm,
        }
        # GitRepositories first: the others refer to them.
        order = {"GitRepository": 0}
        documents = []
        core_files = []
        files = sorted((self.gitops / "argocd").glob("*.yaml")) + sorted((self.gitops / "flux").glob("*.yaml"))
        if not files:
            self.fail(str(self.gitops), "no manifests under argocd/ or flux/")
        for path in files:
            name = path.relative_to(self.gitops.parent)
            try:
                loaded = list(yaml.load_all(path.read_text(encoding="utf-8"), Loader=JsonLoader))
            except yaml.YAMLError as error:
                self.fail(name, f"not valid YAML: {error}")
                continue
            loaded = [d for d in loaded if d is not None]
            for index, doc in enumerate(loaded):
                documents.append((f"{name} (object {index + 1})", doc))
            core_kinds = [isinstance(d, dict) and str(d.get("apiVersion")) == "v1" for d in loaded]
            if any(core_kinds) and not all(core_kinds):
                self.fail(name, "mixes core objects with custom resources: keep them in separate files")
            elif loaded and all(core_kinds):
                core_files.append(str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path))
        for where, doc in sorted(documents, key=lambda d: order.get(d[1].get("kind") if isinstance(d[1], dict) else None, 1)):
            if not isinstance(doc, dict):
                self.fail(where, "not an object")
                continue
            api_kind = (doc.get("apiVersion"), doc.get("kind"))
            if not isinstance((doc.get("metadata") or {}).get("name"), str):
                self.fail(where, "metadata.name is missing")
                continue
            check = kinds.get(api_kind)
            if check is None:
                self.fail(where, f"unexpected {api_kind[0]}/{api_kind[1]}")
                continue
            if api_kind == ("v1", "ConfigMap") and doc["metadata"]["name"] != "argocd-cm":
                self.fail(where, f"ConfigMap {doc['metadata']['name']} is not argocd-cm")
                continue
            check(where, doc)
        Path(core_out).write_text("".join(f"{f}\n" for f in core_files), encoding="utf-8")
        for line in self.summary:
            print(f"  {line}")
        if self.problems:
            for problem in self.problems:
                print(f"  {problem}", file=sys.stderr)
            sys.exit(f"{len(self.problems)} problem(s) with the GitOps manifests")
        print(f"{len(documents)} objects in {len(files)} files checked; {len(core_files)} files of core objects for kubernetes-validate")


def main():
    if len(sys.argv) != 4:
        sys.exit(f"usage: {sys.argv[0]} REPO_ROOT GITOPS_DIR CORE_FILES.txt")
    Checker(Path(sys.argv[1]), Path(sys.argv[2]).resolve()).run(sys.argv[3])


if __name__ == "__main__":
    main()
