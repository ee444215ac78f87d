#!/usr/bin/env python3
"""Turns the Argo CD health-check tests into one Lua file for health_harness.lua.

    health_cases.py ARGOCD_HEALTH_DIR CRD_DIR OUT.lua

For every GROUP/KIND/health_test.yaml under ARGOCD_HEALTH_DIR (the layout and format of Argo
CD's resource_customizations: tests[].inputPath and tests[].healthStatus.{status,message}), each
input is loaded and checked before it is written out, so a test cannot pass on an object the API
server would never return:
  - apiVersion GROUP/<the CRD's version> and kind KIND, a metadata.name and an integer
    metadata.generation;
  - spec and status valid against the CRD in CRD_DIR, with unknown fields refused (a misspelt
    status field would otherwise test nothing);
  - only JSON values, as Kubernetes reads YAML: timestamps stay strings, and a null in a list
    (a hole in a Lua table) is refused.
Each kind must have at least three tests covering Healthy, Progressing and Degraded, and every
file under testdata/ must be used by a test. Exits 1 with every problem listed.

Needs PyYAML and jsonschema (both in the project's venv, .tools/venv).
"""

import copy
import sys
from pathlib import Path

import jsonschema
import yaml

HEALTH_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}
REQUIRED_PER_KIND = {"Healthy", "Progressing", "Degraded"}


class JsonLoader(yaml.SafeLoader):
    """YAML as Kubernetes reads it: no timestamps (they stay strings)."""


JsonLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def strict(schema):
    """A CRD's structural schema as JSON Schema: nullable honoured, unknown fields refused."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if node.get("nullable") and isinstance(node.get("type"), str):
                node["type"] = [node["type"], "null"]
            if (
                node.get("type") in ("object", ["object", "null"])
                and "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def load_crds(crd_dir):
    crds = {}
    for path in sorted(Path(crd_dir).glob("*.yaml")):
        crd = yaml.load(path.read_text(encoding="utf-8"), Loader=JsonLoader)
        spec = crd["spec"]
        [version] = [v for v in spec["versions"] if v.get("served") and v.get("storage")]
        schema = version["schema"]["openAPIV3Schema"]
        crds[(spec["group"], spec["names"]["kind"])] = (
            f"{spec['group']}/{version['name']}",
            {part: strict(schema["properties"][part]) for part in ("spec", "status")},
        )
    return crds


def json_problems(value, where="$"):
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                yield f"{where}: key {key!r} is not a string"
            yield from json_problems(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if item is None:
                yield f"{where}[{index}]: null in a list (a hole in a Lua table)"
            yield from json_problems(item, f"{where}[{index}]")
    elif value is not None and not isinstance(value, (str, bool, int, float)):
        yield f"{where}: {type(value).__name__} is not a JSON value (quote it)"


def lua_string(text):
    out = []
    for byte in text.encode("utf-8"):
        char = chr(byte)
        if char in '\\"':
            out.append("\\" + char)
        elif 32 <= byte < 127:
            out.append(char)
        else:
            # Decimal escapes, valid in Lua 5.1 to 5.4, with three digits so a digit after
            # them is never read as part of them.
            out.append(f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


def lua(value, indent=""):
    inner = indent + "  "
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # Argo CD hands every number to Lua as a float; Kubernetes objects rarely have any.
        return repr(value)
    if isinstance(value, str):
        return lua_string(value)
    if isinstance(value, list):
        if not value:
            return "{}"
        return "{\n" + "".join(f"{inner}{lua(item, inner)},\n" for item in value) + indent + "}"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return (
            "{\n"
            + "".join(f"{inner}[{lua_string(key)}] = {lua(item, inner)},\n" for key, item in value.items())
            + indent
            + "}"
        )
    raise TypeError(type(value))


def main():
    if len(sys.argv) != 4:
        sys.exit(f"usage: {sys.argv[0]} ARGOCD_HEALTH_DIR CRD_DIR OUT.lua")
    health_dir, crd_dir, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    crds = load_crds(crd_dir)
    problems = []
    cases = []
    kinds = sorted(p.parent for p in health_dir.glob("*/*/health.lua"))
    if not kinds:
        problems.append(f"no GROUP/KIND/health.lua under {health_dir}")
    for kind_dir in kinds:
        group, kind = kind_dir.parent.name, kind_dir.name
        label = f"{group}/{kind}"
        if (group, kind) not in crds:
            problems.append(f"{label}: no CRD for it in {crd_dir}")
            continue
        api_version, schemas = crds[(group, kind)]
        test_file = kind_dir / "health_test.yaml"
        if not test_file.exists():
            problems.append(f"{label}: {test_file} is missing")
            continue
        tests = (yaml.load(test_file.read_text(encoding="utf-8"), Loader=JsonLoader) or {}).get("tests") or []
        seen_statuses = set()
        used = set()
        for number, test in enumerate(tests, 1):
            where = f"{test_file}: test {number}"
            expected = (test or {}).get("healthStatus") or {}
            input_path = (test or {}).get("inputPath")
            if not input_path or not isinstance(expected.get("status"), str) or not isinstance(expected.get("message"), str):
                problems.append(f"{where}: needs inputPath, healthStatus.status and healthStatus.message")
                continue
            if expected["status"] not in HEALTH_STATUSES:
                problems.append(f"{where}: {expected['status']!r} is not an Argo CD health status")
            path = kind_dir / input_path
            used.add(path.resolve())
            if not path.exists():
                problems.append(f"{where}: {path} does not exist")
                continue
            documents = [d for d in yaml.load_all(path.read_text(encoding="utf-8"), Loader=JsonLoader) if d is not None]
            if len(documents) != 1:
                problems.append(f"{path}: holds {len(documents)} objects, not one")
                continue
            obj = documents[0]
            object_problems = list(json_problems(obj))
            if obj.get("apiVersion") != api_version or obj.get("kind") != kind:
                object_problems.append(
                    f"apiVersion/kind is {obj.get('apiVersion')}/{obj.get('kind')}, not {api_version}/{kind}"
                )
            metadata = obj.get("metadata") or {}
            if not metadata.get("name"):
                object_problems.append("metadata.name is missing")
            if type(metadata.get("generation")) is not int:
                object_problems.append("metadata.generation must be an integer (the API server always sets it)")
            for part in ("spec", "status"):
                if part not in obj:
                    if part == "spec":
                        object_problems.append("spec is missing")
                    continue
                validator = jsonschema.Draft7Validator(schemas[part])
                for error in sorted(validator.iter_errors(obj[part]), key=lambda e: list(e.absolute_path)):
                    field = ".".join([part] + [str(p) for p in error.absolute_path])
                    object_problems.append(f"{field}: {error.message}")
            unknown = set(obj) - {"apiVersion", "kind", "metadata", "spec", "status"}
            if unknown:
                object_problems.append(f"unknown top-level fields {sorted(unknown)}")
            if object_problems:
                problems.extend(f"{path}: {p}" for p in object_problems)
                continue
            seen_statuses.add(expected["status"])
            cases.append(
                {
                    "name": f"{label} {input_path}",
                    "script": str((kind_dir / "health.lua").resolve()),
                    "status": expected["status"],
                    "message": expected["message"],
                    "obj": obj,
                }
            )
        if len(tests) < 3:
            problems.append(f"{test_file}: {len(tests)} tests; each kind needs at least 3")
        missing = REQUIRED_PER_KIND - seen_statuses
        if missing:
            problems.append(f"{test_file}: no test expects {', '.join(sorted(missing))}")
        for fixture in sorted((kind_dir / "testdata").glob("*")):
            if fixture.resolve() not in used:
                problems.append(f"{fixture}: not used by any test in {test_file}")
    if problems:
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        sys.exit(f"{len(problems)} problem(s) with the health-check tests")
    out.write_text("-- Generated by gitops/tests/health_cases.py.\nreturn " + lua(cases) + "\n", encoding="utf-8")
    print(f"{len(cases)} tests over {len(kinds)} kinds, every input valid against its CRD")


if __name__ == "__main__":
    main()
