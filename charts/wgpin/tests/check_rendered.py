"""Checks what `helm template` rendered against what the chart promises for the given values.

    check_rendered.py RENDERED.yaml RELEASE NAMESPACE [VALUES.yaml]

Reads the chart's values.yaml, merges VALUES.yaml over it the way Helm does (maps merge, other
values replace), and checks the rendered objects: the set of objects, names and labels, the
operator's Deployment, Service and PodDisruptionBudget, the agent's DaemonSet and Service (the
exact command lines, probes, security contexts and host mounts), every RBAC rule (the exact
least-privilege table of the README), and the Prometheus Operator objects. Prints one line per
problem and exits 1 if there is any.

Also writes RENDERED.yaml.k8s: the same objects without the Prometheus Operator kinds
(ServiceMonitor, PrometheusRule), which are custom resources kubernetes-validate has no schema
for; this script checks those two kinds itself.
"""

import json
import os
import sys

import yaml

CHART = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MONITORING_GROUP = "monitoring.coreos.com/"

problems = []


def problem(message):
    problems.append(message)


def expect(what, got, want):
    if got != want:
        problem(f"{what}: got {got!r}, want {want!r}")


def merge(base, override):
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = merge(base.get(key), value)
        return out
    return override


def load_values(path):
    with open(os.path.join(CHART, "values.yaml")) as f:
        values = yaml.safe_load(f)
    if path:
        with open(path) as f:
            values = merge(values, yaml.safe_load(f) or {})
    return values


def chart():
    with open(os.path.join(CHART, "Chart.yaml")) as f:
        return yaml.safe_load(f)


def fullname(values, release):
    if values.get("fullnameOverride"):
        return values["fullnameOverride"][:54].rstrip("-")
    name = values.get("nameOverride") or "wgpin"
    if name in release:
        return release[:54].rstrip("-")
    return f"{release}-{name}"[:54].rstrip("-")


def image(spec, app_version):
    if spec.get("digest"):
        return f"{spec['repository']}@{spec['digest']}"
    return f"{spec['repository']}:{spec.get('tag') or app_version}"


def listen(metrics):
    address = metrics["bindAddress"]
    if ":" in address:
        address = f"[{address}]"
    return f"{address}:{metrics['port']}"


def selector(values, release, component):
    return {
        "app.kubernetes.io/name": values.get("nameOverride") or "wgpin",
        "app.kubernetes.io/instance": release,
        "app.kubernetes.io/component": component,
    }


def rules_of(role):
    """The rules as a set of (apiGroups, resources, resourceNames, verbs) tuples."""
    out = set()
    for rule in role.get("rules") or []:
        out.add(
            (
                tuple(sorted(rule.get("apiGroups", []))),
                tuple(sorted(rule.get("resources", []))),
                tuple(sorted(rule.get("resourceNames", []))),
                tuple(sorted(rule.get("verbs", []))),
            )
        )
    return out


def rule(groups, resources, verbs, names=()):
    return (tuple(sorted(groups)), tuple(sorted(resources)), tuple(sorted(names)), tuple(sorted(verbs)))


def container(pod_spec, name, what):
    containers = pod_spec.get("containers") or []
    expect(f"{what}: container names", [c.get("name") for c in containers], [name])
    return containers[0] if containers else {}


def probes(c, what, port):
    ports = c.get("ports") or []
    expect(f"{what}: container ports", [(p.get("name"), p.get("containerPort"), p.get("protocol")) for p in ports], [("metrics", port, "TCP")])
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        got = (c.get(probe) or {}).get("httpGet") or {}
        expect(f"{what}: {probe}", (got.get("path"), got.get("port")), (path, "metrics"))


def env_from_field(c, name):
    for env in c.get("env") or []:
        if env.get("name") == name:
            return ((env.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
    return None


def main():
    rendered_path, release, namespace = sys.argv[1:4]
    values = load_values(sys.argv[4] if len(sys.argv) > 4 else None)
    app_version = chart()["appVersion"]
    full = fullname(values, release)
    op, ag = values["operator"], values["agent"]
    events_ns = values["eventNamespace"]

    with open(rendered_path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    with open(rendered_path + ".k8s", "w") as f:
        yaml.safe_dump_all([d for d in docs if not d.get("apiVersion", "").startswith(MONITORING_GROUP)], f)

    objects = {}
    for d in docs:
        key = (d.get("kind"), (d.get("metadata") or {}).get("namespace"), (d.get("metadata") or {}).get("name"))
        if key in objects:
            problem(f"{key}: rendered twice")
        objects[key] = d

    # Which objects, exactly.
    want = {
        ("Deployment", namespace, f"{full}-operator"),
        ("Service", namespace, f"{full}-operator-metrics"),
        ("DaemonSet", namespace, f"{full}-agent"),
        ("Service", namespace, f"{full}-agent-metrics"),
    }
    if op["serviceAccount"]["create"]:
        want.add(("ServiceAccount", namespace, op["serviceAccount"]["name"] or f"{full}-operator"))
    if ag["serviceAccount"]["create"]:
        want.add(("ServiceAccount", namespace, ag["serviceAccount"]["name"] or f"{full}-agent"))
    if op["podDisruptionBudget"]["enabled"] and op["replicas"] > 1:
        want.add(("PodDisruptionBudget", namespace, f"{full}-operator"))
    if values["rbac"]["create"]:
        for component in ("operator", "agent"):
            want.add(("ClusterRole", None, f"{full}-{component}"))
            want.add(("ClusterRoleBinding", None, f"{full}-{component}"))
            want.add(("Role", events_ns, f"{full}-{component}-events"))
            want.add(("RoleBinding", events_ns, f"{full}-{component}-events"))
        want.add(("Role", namespace, f"{full}-operator-leader-election"))
        want.add(("RoleBinding", namespace, f"{full}-operator-leader-election"))
        # One Role per namespace chosen for preshared-key Secrets; none by default.
        for secrets_ns in ag.get("presharedKeySecretNamespaces") or []:
            want.add(("Role", secrets_ns, f"{full}-agent-secrets"))
            want.add(("RoleBinding", secrets_ns, f"{full}-agent-secrets"))
    monitoring = values.get("monitoring") or {}
    if (monitoring.get("serviceMonitor") or {}).get("enabled"):
        want.add(("ServiceMonitor", namespace, f"{full}-operator"))
        want.add(("ServiceMonitor", namespace, f"{full}-agent"))
    if (monitoring.get("prometheusRule") or {}).get("enabled"):
        want.add(("PrometheusRule", namespace, full))
    for missing in sorted(want - set(objects), key=str):
        problem(f"missing: {missing}")
    for extra in sorted(set(objects) - want, key=str):
        problem(f"not expected: {extra}")

    # Names and labels of every object.
    for (kind, _, name), d in objects.items():
        labels = (d.get("metadata") or {}).get("labels") or {}
        if len(name or "") > 63:
            problem(f"{kind}/{name}: name longer than 63 characters")
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component",
                    "app.kubernetes.io/version", "app.kubernetes.io/part-of", "app.kubernetes.io/managed-by", "helm.sh/chart"):
            if key not in labels:
                problem(f"{kind}/{name}: no label {key}")
        expect(f"{kind}/{name}: app.kubernetes.io/instance", labels.get("app.kubernetes.io/instance"), release)
        expect(f"{kind}/{name}: app.kubernetes.io/managed-by", labels.get("app.kubernetes.io/managed-by"), "Helm")
        for key, value in (values.get("commonLabels") or {}).items():
            expect(f"{kind}/{name}: common label {key}", labels.get(key), value)

    check_operator(objects, values, release, namespace, full, app_version)
    check_agent(objects, values, release, namespace, full, app_version)
    if values["rbac"]["create"]:
        check_rbac(objects, values, namespace, full)
    check_monitoring(objects, values, release, namespace, full)

    for p in problems:
        print(f"  {rendered_path}: {p}")
    return 1 if problems else 0


def check_pod_metadata(what, template, values, release, component, settings):
    metadata = template.get("metadata") or {}
    labels = metadata.get("labels") or {}
    for key, value in {**selector(values, release, component), **(values.get("commonLabels") or {}), **(settings.get("podLabels") or {})}.items():
        expect(f"{what}: pod label {key}", labels.get(key), value)
    expect(f"{what}: pod annotations", metadata.get("annotations"), settings.get("podAnnotations") or None)


def check_service(objects, namespace, name, values, release, component, port, headless):
    svc = objects.get(("Service", namespace, name))
    if not svc:
        return
    spec = svc["spec"]
    expect(f"Service/{name}: selector", spec.get("selector"), selector(values, release, component))
    expect(f"Service/{name}: ports", [(p.get("name"), p.get("port"), p.get("targetPort")) for p in spec.get("ports", [])], [("metrics", port, "metrics")])
    expect(f"Service/{name}: clusterIP None (headless)", spec.get("clusterIP") == "None", headless)


def check_operator(objects, values, release, namespace, full, app_version):
    op = values["operator"]
    name = f"{full}-operator"
    dep = objects.get(("Deployment", namespace, name))
    if not dep:
        return
    what = f"Deployment/{name}"
    spec = dep["spec"]
    expect(f"{what}: replicas", spec.get("replicas"), op["replicas"])
    expect(f"{what}: selector", spec["selector"].get("matchLabels"), selector(values, release, "operator"))
    template = spec["template"]
    check_pod_metadata(what, template, values, release, "operator", op)
    pod = template["spec"]
    expect(f"{what}: serviceAccountName", pod.get("serviceAccountName"), op["serviceAccount"]["name"] or name)
    expect(f"{what}: pod securityContext", pod.get("securityContext"), op["podSecurityContext"] or None)
    expect(f"{what}: nodeSelector", pod.get("nodeSelector"), op["nodeSelector"] or None)
    expect(f"{what}: tolerations", pod.get("tolerations"), op["tolerations"] or None)
    expect(f"{what}: imagePullSecrets", pod.get("imagePullSecrets"), values.get("imagePullSecrets") or None)
    anti = ((pod.get("affinity") or {}).get("podAntiAffinity") or {})
    if op["affinity"]:
        expect(f"{what}: affinity", pod.get("affinity"), op["affinity"])
    else:
        preset = op["podAntiAffinity"] if op["replicas"] > 1 else "none"
        got = "hard" if anti.get("requiredDuringSchedulingIgnoredDuringExecution") else "soft" if anti.get("preferredDuringSchedulingIgnoredDuringExecution") else "none"
        expect(f"{what}: pod anti-affinity", got, preset)
    c = container(pod, "operator", what)
    expect(f"{what}: image", c.get("image"), image(op["image"], app_version))
    expect(f"{what}: imagePullPolicy", c.get("imagePullPolicy"), op["image"]["pullPolicy"])
    expect(f"{what}: args", c.get("args"), [
        f"--metrics-addr={listen(op['metrics'])}",
        f"--log-format={op['logFormat']}",
        f"--cleanup-grace-seconds={op['cleanupGraceSeconds']}",
        f"--resync-seconds={op['resyncSeconds']}",
        f"--lease-name={op['leaderElection']['leaseName']}",
        f"--lease-namespace={namespace}",
        f"--event-namespace={values['eventNamespace']}",
    ] + list(op.get("extraArgs") or []))
    expect(f"{what}: POD_NAME from the downward API", env_from_field(c, "POD_NAME"), "metadata.name")
    probes(c, what, op["metrics"]["port"])
    expect(f"{what}: resources", c.get("resources"), op["resources"] or None)
    expect(f"{what}: container securityContext", c.get("securityContext"), op["securityContext"] or None)
    # The defaults must be the hardened ones the README promises.
    defaults = load_values(None)["operator"]
    expect("default operator podSecurityContext.runAsNonRoot", defaults["podSecurityContext"].get("runAsNonRoot"), True)
    expect("default operator seccompProfile", defaults["podSecurityContext"].get("seccompProfile"), {"type": "RuntimeDefault"})
    expect("default operator readOnlyRootFilesystem", defaults["securityContext"].get("readOnlyRootFilesystem"), True)
    expect("default operator allowPrivilegeEscalation", defaults["securityContext"].get("allowPrivilegeEscalation"), False)
    expect("default operator capabilities", defaults["securityContext"].get("capabilities"), {"drop": ["ALL"]})
    expect("default operator replicas", defaults["replicas"], 2)

    check_service(objects, namespace, f"{name}-metrics", values, release, "operator", op["metrics"]["port"], False)

    pdb = objects.get(("PodDisruptionBudget", namespace, name))
    if pdb:
        expect(f"PodDisruptionBudget/{name}: minAvailable", pdb["spec"].get("minAvailable"), op["podDisruptionBudget"]["minAvailable"])
        expect(f"PodDisruptionBudget/{name}: selector", pdb["spec"]["selector"].get("matchLabels"), selector(values, release, "operator"))


def check_agent(objects, values, release, namespace, full, app_version):
    ag = values["agent"]
    name = f"{full}-agent"
    ds = objects.get(("DaemonSet", namespace, name))
    if not ds:
        return
    what = f"DaemonSet/{name}"
    spec = ds["spec"]
    expect(f"{what}: selector", spec["selector"].get("matchLabels"), selector(values, release, "agent"))
    expect(f"{what}: updateStrategy", spec.get("updateStrategy"), {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 0, "maxUnavailable": ag["updateStrategy"]["maxUnavailable"]},
    })
    template = spec["template"]
    check_pod_metadata(what, template, values, release, "agent", ag)
    pod = template["spec"]
    expect(f"{what}: hostNetwork", pod.get("hostNetwork"), True)
    expect(f"{what}: dnsPolicy", pod.get("dnsPolicy"), "ClusterFirstWithHostNet")
    expect(f"{what}: serviceAccountName", pod.get("serviceAccountName"), ag["serviceAccount"]["name"] or name)
    expect(f"{what}: nodeSelector", pod.get("nodeSelector"), ag["nodeSelector"] or None)
    expect(f"{what}: tolerations", pod.get("tolerations"), ag["tolerations"] or None)
    expect(f"{what}: priorityClassName", pod.get("priorityClassName"), ag["priorityClassName"] or None)
    expect(f"{what}: seccompProfile", (pod.get("securityContext") or {}).get("seccompProfile"), ag["seccompProfile"])
    c = container(pod, "agent", what)
    expect(f"{what}: image", c.get("image"), image(ag["image"], app_version))
    backend = ag["wireguard"]["backend"]
    expect(f"{what}: args", c.get("args"), [
        f"--log-format={ag['logFormat']}",
        "cluster",
        "--node=$(NODE_NAME)",
    ] + [f"--underlay={u}" for u in ag["underlay"]] + [
        f"--hook={ag['hook']}",
        f"--state-dir={ag['stateDir']}",
        "--bpffs-root=/sys/fs/bpf/wgpin",
        f"--backend={backend}",
        f"--wireguard-go={ag['wireguard']['wireguardGo']}",
        f"--metrics-addr={listen(ag['metrics'])}",
        f"--event-namespace={values['eventNamespace']}",
    ] + list(ag.get("extraArgs") or []))
    expect(f"{what}: NODE_NAME from the downward API", env_from_field(c, "NODE_NAME"), "spec.nodeName")
    probes(c, what, ag["metrics"]["port"])
    expect(f"{what}: resources", c.get("resources"), ag["resources"] or None)

    sc = c.get("securityContext") or {}
    expect(f"{what}: runAsUser", sc.get("runAsUser"), 0)
    expect(f"{what}: readOnlyRootFilesystem", sc.get("readOnlyRootFilesystem"), True)
    if ag["privileged"]:
        expect(f"{what}: privileged", sc.get("privileged"), True)
    else:
        expect(f"{what}: privileged", sc.get("privileged"), False)
        expect(f"{what}: allowPrivilegeEscalation", sc.get("allowPrivilegeEscalation"), False)
        caps = sc.get("capabilities") or {}
        expect(f"{what}: capabilities dropped", caps.get("drop"), ["ALL"])
        added = ["BPF", "NET_ADMIN", "PERFMON"] + (["SYS_ADMIN"] if ag["identityMode"] else [])
        expect(f"{what}: capabilities added", sorted(caps.get("add") or []), sorted(added))

    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    mounts = {m["name"]: m for m in c.get("volumeMounts") or []}
    want = {
        "bpffs": ("/sys/fs/bpf", "Directory", "/sys/fs/bpf"),
        "state": (ag["stateDir"], "DirectoryOrCreate", ag["stateDir"]),
    }
    if backend == "userspace":
        want["wireguard-sockets"] = ("/var/run/wireguard", "DirectoryOrCreate", "/var/run/wireguard")
        want["tun"] = ("/dev/net/tun", "CharDevice", "/dev/net/tun")
    got = {
        n: ((v.get("hostPath") or {}).get("path"), (v.get("hostPath") or {}).get("type"), (mounts.get(n) or {}).get("mountPath"))
        for n, v in volumes.items()
    }
    expect(f"{what}: host volumes (path, type, mountPath)", got, want)
    expect(f"{what}: mounts", sorted(mounts), sorted(want))
    expect(f"{what}: bpffs mount propagation", (mounts.get("bpffs") or {}).get("mountPropagation"), "HostToContainer")

    defaults = load_values(None)["agent"]
    expect("default agent.underlay", defaults["underlay"], ["eth0"])
    expect("default agent.privileged", defaults["privileged"], False)

    check_service(objects, namespace, f"{name}-metrics", values, release, "agent", ag["metrics"]["port"], True)


def check_rbac(objects, values, namespace, full):
    events_ns = values["eventNamespace"]
    lease = values["operator"]["leaderElection"]["leaseName"]
    sa = {
        "operator": values["operator"]["serviceAccount"]["name"] or f"{full}-operator",
        "agent": values["agent"]["serviceAccount"]["name"] or f"{full}-agent",
    }
    # The rules come from the code's own list (wgpin_crds::access, written by crdgen), so
    # the chart and the code cannot drift apart.
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "access.json")) as f:
        access = json.load(f)
    secret_namespaces = values["agent"].get("presharedKeySecretNamespaces") or []
    # The Roles each scope's rules go to (SecretNamespaces: one per namespace, none by default).
    role_of = {
        ("operator", "Cluster"): [("ClusterRole", None, f"{full}-operator")],
        ("operator", "ReleaseNamespace"): [("Role", namespace, f"{full}-operator-leader-election")],
        ("operator", "EventNamespace"): [("Role", events_ns, f"{full}-operator-events")],
        ("agent", "Cluster"): [("ClusterRole", None, f"{full}-agent")],
        ("agent", "EventNamespace"): [("Role", events_ns, f"{full}-agent-events")],
        ("agent", "SecretNamespaces"): [("Role", ns, f"{full}-agent-secrets") for ns in secret_namespaces],
    }
    want = {key: set() for keys in role_of.values() for key in keys}
    for component in ("operator", "agent"):
        for entry in access[component]:
            keys = role_of.get((component, entry["scope"]))
            if keys is None:
                problem(f"access.json: no Role for the {component}'s {entry['scope']} rules")
                continue
            names = [lease if entry["resourceName"] == "{leaseName}" else entry["resourceName"]] if entry["resourceName"] else []
            for key in keys:
                want[key].add(rule([entry["group"]], [entry["resource"]], entry["verbs"] + entry["impliedVerbs"], names))
    for key, rules in want.items():
        role = objects.get(key)
        if role is None:
            continue
        got = rules_of(role)
        for r in sorted(got - rules):
            problem(f"{key[0]}/{key[2]}: rule not in the least-privilege table: {r}")
        for r in sorted(rules - got):
            problem(f"{key[0]}/{key[2]}: missing rule {r}")
        binding_kind = "ClusterRoleBinding" if key[0] == "ClusterRole" else "RoleBinding"
        binding = objects.get((binding_kind, key[1], key[2]))
        if binding is None:
            continue
        component = "operator" if f"{full}-operator" in key[2] else "agent"
        expect(f"{binding_kind}/{key[2]}: roleRef", binding.get("roleRef"), {"apiGroup": "rbac.authorization.k8s.io", "kind": key[0], "name": key[2]})
        expect(f"{binding_kind}/{key[2]}: subjects", binding.get("subjects"), [{"kind": "ServiceAccount", "name": sa[component], "namespace": namespace}])


def check_monitoring(objects, values, release, namespace, full):
    monitoring = values.get("monitoring") or {}
    sm = monitoring.get("serviceMonitor") or {}
    for component in ("operator", "agent"):
        obj = objects.get(("ServiceMonitor", namespace, f"{full}-{component}"))
        if not obj:
            continue
        what = f"ServiceMonitor/{full}-{component}"
        expect(f"{what}: apiVersion", obj.get("apiVersion"), "monitoring.coreos.com/v1")
        for key, value in (sm.get("labels") or {}).items():
            expect(f"{what}: label {key}", obj["metadata"]["labels"].get(key), value)
        spec = obj.get("spec") or {}
        # The ServiceMonitor selects the Service by its labels: they must match.
        svc = objects.get(("Service", namespace, f"{full}-{component}-metrics")) or {}
        svc_labels = (svc.get("metadata") or {}).get("labels") or {}
        match = (spec.get("selector") or {}).get("matchLabels") or {}
        if not match or any(svc_labels.get(k) != v for k, v in match.items()):
            problem(f"{what}: selector {match} does not select Service {full}-{component}-metrics ({svc_labels})")
        expect(f"{what}: namespaceSelector", spec.get("namespaceSelector"), {"matchNames": [namespace]})
        endpoints = spec.get("endpoints") or []
        expect(f"{what}: endpoints", [(e.get("port"), e.get("path"), e.get("interval"), e.get("scrapeTimeout")) for e in endpoints],
               [("metrics", "/metrics", sm.get("interval"), sm.get("scrapeTimeout"))])
    rule_obj = objects.get(("PrometheusRule", namespace, full))
    if rule_obj:
        what = f"PrometheusRule/{full}"
        expect(f"{what}: apiVersion", rule_obj.get("apiVersion"), "monitoring.coreos.com/v1")
        alerts = {}
        for group in (rule_obj.get("spec") or {}).get("groups") or []:
            for r in group.get("rules") or []:
                alerts[r.get("alert")] = (r.get("expr"), r.get("for"))
                if not (r.get("labels") or {}).get("severity"):
                    problem(f"{what}: alert {r.get('alert')} has no severity")
                if not (r.get("annotations") or {}).get("description"):
                    problem(f"{what}: alert {r.get('alert')} has no description")
        expect(f"{what}: alerts", alerts, {
            "WgpinSourceViolations": ("increase(wgpin_violation_events_total[5m]) > 0", None),
            "WgpinFastPathNotVerified": ("wgpin_fastpath_verified == 0", "1m"),
            "WgpinPeerWithdrawn": ("increase(wgpin_withdrawals_total[5m]) > 0", None),
            "WgpinOperatorNoLeader": ("max(wgpin_operator_leader) < 1", "5m"),
        })


if __name__ == "__main__":
    sys.exit(main())
