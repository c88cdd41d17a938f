"""The deployment files agree with the code: the Helm chart's values against
its schema and against chassis.config, its readiness probes against the
generated descriptors, its environment against what production requires,
and the Dockerfile's stub generation against protos/ and the Makefile.

Neither Helm nor PyYAML nor jsonschema is a dependency of the project, so
values.yaml is read by a small loader of the YAML subset it is written in
(it refuses anything else rather than guess), and values.schema.json is
checked by a small draft-07 validator of the keywords the schema uses (it
refuses other keywords, so a schema change cannot go unchecked).
"""

from __future__ import annotations

import base64
import importlib
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pool

from chassis.config import (
    ALL_SERVICES,
    DEFAULT_GRPC_PORTS,
    DEFAULT_HTTP_PORT,
    GRPC_SERVICES,
    Settings,
)
from chassis.crypto import keys_from_env

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "cornucopia"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
TEMPLATES = CHART / "templates"

# -- a loader for the YAML subset values.yaml is written in -------------------

_PLAIN_INT = re.compile(r"^[-+]?[0-9]+$")
_PLAIN_FLOAT = re.compile(r"^[-+]?([0-9]+\.[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$")
# YAML 1.1 (which Helm reads) makes these booleans; quote them instead.
_AMBIGUOUS = {"y", "n", "yes", "no", "on", "off"}


def _strip_comment(line: str) -> str:
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


def _scalar(text: str) -> Any:
    text = text.strip()
    if text.startswith('"'):
        return json.loads(text)
    if text.startswith("'"):
        if not text.endswith("'") or len(text) < 2:
            raise ValueError(f"unterminated string: {text}")
        return text[1:-1].replace("''", "'")
    if text[:1] in ("&", "*", "!", "|", ">", "%", "@", "`"):
        raise ValueError(f"YAML feature outside the supported subset: {text}")
    if text.lower() in _AMBIGUOUS:
        raise ValueError(f"quote {text!r}: YAML 1.1 reads it as a boolean")
    if text in ("true", "True", "TRUE"):
        return True
    if text in ("false", "False", "FALSE"):
        return False
    if text in ("", "~", "null", "Null", "NULL"):
        return None
    if _PLAIN_INT.match(text):
        return int(text)
    if _PLAIN_FLOAT.match(text):
        return float(text)
    return text


class _Flow:
    """``[a, "b"]`` and ``{k: v}``, nested."""

    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def parse(self) -> Any:
        value = self._value()
        if self.text[self.pos :].strip():
            raise ValueError(f"unexpected text after flow value: {self.text!r}")
        return value

    def _skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] == " ":
            self.pos += 1

    def _value(self) -> Any:
        self._skip()
        ch = self.text[self.pos : self.pos + 1]
        if ch == "[":
            return self._collection("]", self._value)
        if ch == "{":
            return dict(self._collection("}", self._pair))
        return _scalar(self._token())

    def _pair(self) -> tuple[str, Any]:
        key = _scalar(self._token(stop=":"))
        if self.text[self.pos : self.pos + 1] != ":":
            raise ValueError(f"expected ':' in {self.text!r}")
        self.pos += 1
        return str(key), self._value()

    def _collection(self, close: str, item: Any) -> list[Any]:
        self.pos += 1
        items: list[Any] = []
        self._skip()
        if self.text[self.pos : self.pos + 1] == close:
            self.pos += 1
            return items
        while True:
            items.append(item())
            self._skip()
            ch = self.text[self.pos : self.pos + 1]
            self.pos += 1
            if ch == close:
                return items
            if ch != ",":
                raise ValueError(f"expected ',' or {close!r} in {self.text!r}")

    def _token(self, stop: str = "") -> str:
        self._skip()
        start = self.pos
        if self.text[start : start + 1] in "\"'":
            quote = self.text[start]
            end = self.text.index(quote, start + 1)
            self.pos = end + 1
            return self.text[start : end + 1]
        while self.pos < len(self.text) and self.text[self.pos] not in ",]}" + stop:
            self.pos += 1
        return self.text[start : self.pos].strip()


def _value_text(text: str) -> Any:
    return _Flow(text).parse() if text[:1] in "[{" else _scalar(text)


def _split_key(text: str) -> tuple[str, str]:
    quote = ""
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == ":" and (i + 1 == len(text) or text[i + 1] == " "):
            return str(_scalar(text[:i])), text[i + 1 :].strip()
    raise ValueError(f"not a 'key: value' line: {text!r}")


def load_yaml_subset(text: str) -> Any:
    lines: list[list[Any]] = []
    for raw in text.splitlines():
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise ValueError("tabs in indentation")
        line = _strip_comment(raw)
        if line.strip() == "---":
            raise ValueError("one document only")
        if line.strip():
            lines.append([len(line) - len(line.lstrip(" ")), line.strip()])

    def block(i: int, indent: int) -> tuple[Any, int]:
        if lines[i][1].startswith("- ") or lines[i][1] == "-":
            items: list[Any] = []
            while i < len(lines) and lines[i][0] == indent and lines[i][1][:2] in ("- ", "-"):
                rest = lines[i][1][1:].strip()
                if not rest:
                    value, i = block(i + 1, lines[i + 1][0])
                elif rest[:1] not in "[{\"'" and re.search(r":( |$)", rest):
                    lines[i] = [indent + 2, rest]  # "- key: value" opens a mapping
                    value, i = block(i, indent + 2)
                else:
                    value, i = _value_text(rest), i + 1
                items.append(value)
            return items, i
        mapping: dict[str, Any] = {}
        while i < len(lines) and lines[i][0] == indent:
            key, rest = _split_key(lines[i][1])
            if key in mapping:
                raise ValueError(f"duplicate key {key!r}")
            i += 1
            if rest:
                mapping[key] = _value_text(rest)
            elif i < len(lines) and (
                lines[i][0] > indent or (lines[i][0] == indent and lines[i][1][:2] == "- ")
            ):
                mapping[key], i = block(i, lines[i][0])
            else:
                mapping[key] = None
        if i < len(lines) and lines[i][0] > indent:
            raise ValueError(f"unexpected indentation at {lines[i][1]!r}")
        return mapping, i

    value, end = block(0, lines[0][0]) if lines else (None, 0)
    if end != len(lines):
        raise ValueError(f"unexpected indentation at {lines[end][1]!r}")
    return value


# -- a validator for the draft-07 keywords values.schema.json uses ------------

KNOWN_KEYWORDS = {
    "$schema",
    "title",
    "description",
    "definitions",
    "$ref",
    "type",
    "enum",
    "const",
    "properties",
    "required",
    "additionalProperties",
    "propertyNames",
    "items",
    "minItems",
    "minimum",
    "maximum",
    "minLength",
    "pattern",
    "if",
    "then",
}
_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "null": lambda v: v is None,
}


def schema_errors(value: Any, schema: Any, root: Any, path: str = "") -> list[str]:
    where = path or "/"
    if schema is True:
        return []
    if schema is False:
        return [f"{where}: not allowed"]
    unknown = set(schema) - KNOWN_KEYWORDS
    if unknown:
        raise AssertionError(f"the test's validator does not implement {sorted(unknown)}")
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return schema_errors(value, target, root, path)
    errors: list[str] = []
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        if not any(_TYPES[t](value) for t in names):
            return [f"{where}: {value!r} is not of type {types}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{where}: {value!r} is not {schema['const']!r}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{where}: {value!r} is too short")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if _TYPES["number"](value):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{where}: {value} is less than {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{where}: {value} is more than {schema['maximum']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{where}: fewer than {schema['minItems']} items")
        for index, item in enumerate(value):
            errors += schema_errors(item, schema.get("items", True), root, f"{path}/{index}")
    if isinstance(value, dict):
        errors += [
            f"{where}: {k!r} is required" for k in schema.get("required", ()) if k not in value
        ]
        properties = schema.get("properties", {})
        for key, item in value.items():
            if "propertyNames" in schema:
                errors += schema_errors(key, schema["propertyNames"], root, f"{path}/{key}")
            sub = properties.get(key, schema.get("additionalProperties", True))
            if sub is False:
                errors.append(f"{where}: additional property {key!r} is not allowed")
            else:
                errors += schema_errors(item, sub, root, f"{path}/{key}")
    if "if" in schema and not schema_errors(value, schema["if"], root, path):
        errors += schema_errors(value, schema.get("then", True), root, path)
    return errors


def subschemas(schema: Any) -> Iterator[dict[str, Any]]:
    if isinstance(schema, dict):
        yield schema
        for key, sub in schema.items():
            if key in ("properties", "definitions"):
                for item in sub.values():
                    yield from subschemas(item)
            elif key in ("items", "additionalProperties", "propertyNames", "if", "then"):
                yield from subschemas(sub)


# -- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    loaded = load_yaml_subset((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    return loaded


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    found = []
    for line in joined.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            instruction, _, rest = stripped.partition(" ")
            found.append((instruction.upper(), " ".join(rest.split())))
    return found


# -- the chart's values ------------------------------------------------------------


def test_the_subset_loader_reads_what_helm_reads() -> None:
    text = """
a: 1  # a comment
b: "x # not a comment"
c: [serve, "members"]
d: {}
e:
  - name: f
    value: '2'
  - 3
g:
- h
i:
"""
    assert load_yaml_subset(text) == {
        "a": 1,
        "b": "x # not a comment",
        "c": ["serve", "members"],
        "d": {},
        "e": [{"name": "f", "value": "2"}, 3],
        "g": ["h"],
        "i": None,
    }
    with pytest.raises(ValueError, match="boolean"):
        load_yaml_subset("enabled: yes\n")


def test_values_match_the_schema(values: dict[str, Any], schema: dict[str, Any]) -> None:
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    for sub in subschemas(schema):
        assert set(sub) <= KNOWN_KEYWORDS, sorted(set(sub) - KNOWN_KEYWORDS)
    assert schema_errors(values, schema, schema) == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda v: v["components"]["cards"].update(kind="tcp"), "/components/cards/kind"),
        (lambda v: v["components"]["cards"].update(replica=3), "'replica' is not allowed"),
        (lambda v: v["components"]["members"].pop("readinessService"), "'readinessService'"),
        (lambda v: v["components"]["members"].update(port=70000), "/components/members/port"),
        (lambda v: v.update(environment="staging"), "/environment"),
        (lambda v: v.update(existingSecret=""), "/existingSecret"),
        (lambda v: v.update(logLevle="DEBUG"), "'logLevle' is not allowed"),
        (lambda v: v["nats"].update(streamReplicas=0), "/nats/streamReplicas"),
        (lambda v: v["nats"].update(streamReplicas=6), "/nats/streamReplicas"),
        (lambda v: v["nats"].pop("streamReplicas"), "'streamReplicas' is required"),
    ],
)
def test_the_schema_refuses_mistakes(
    values: dict[str, Any], schema: dict[str, Any], change: Any, expected: str
) -> None:
    broken = json.loads(json.dumps(values))
    change(broken)
    errors = schema_errors(broken, schema, schema)
    assert any(expected in e for e in errors), errors


def test_components_are_the_services_on_their_default_ports(values: dict[str, Any]) -> None:
    components = values["components"]
    assert set(components) == set(ALL_SERVICES)
    for name, component in components.items():
        assert component["args"] == ["serve", name]
        if name in GRPC_SERVICES:
            assert component["kind"] == "grpc", name
            assert component["port"] == DEFAULT_GRPC_PORTS[name], name
        else:
            assert component["kind"] == "http", name
            assert component["port"] == DEFAULT_HTTP_PORT, name


def test_readiness_probes_ask_for_services_that_exist(values: dict[str, Any]) -> None:
    """A gRPC component's readiness asks for its service's full name once the
    service has an RPC, the overall health ("") before; Kubernetes would
    never see a misspelled name SERVING."""
    pool = descriptor_pool.Default()
    for name, component in values["components"].items():
        if component["kind"] != "grpc":
            continue
        module = importlib.import_module(f"cornucopia.{name}.v1.{name}_pb2")
        services = list(module.DESCRIPTOR.services_by_name.values())
        assert len(services) == 1, f"{name}: expected one service in {name}.proto"
        expected = services[0].full_name if services[0].methods else ""
        assert component["readinessService"] == expected, name
        if expected:
            assert pool.FindServiceByName(component["readinessService"]).methods


def test_the_chart_gives_each_component_what_production_requires(
    values: dict[str, Any],
) -> None:
    helpers = (TEMPLATES / "_helpers.tpl").read_text(encoding="utf-8")
    env_helper = helpers.split('define "cornucopia.env"', 1)[1]
    literal = set(re.findall(r"- name: ([A-Z][A-Z0-9_]*)", env_helper))
    from_secret = set(re.findall(r'"env" "([A-Z][A-Z0-9_]*)"', env_helper))
    assert {
        "CORNUCOPIA_ENV",
        "NATS_URL",
        "NATS_STREAM_REPLICAS",
        "LOG_LEVEL",
        "GRPC_LISTEN",
        "HTTP_LISTEN",
    } <= literal
    assert "$root.Values.nats.streamReplicas" in env_helper
    assert "CORNUCOPIA_TOKEN_SECRET" in from_secret
    assert 'printf "%s_DATABASE_URL"' in env_helper
    assert 'printf "%s_GRPC_ADDR"' in env_helper
    key = base64.b64encode(bytes(range(32))).decode()
    for name, component in values["components"].items():
        env = dict.fromkeys(literal | from_secret, "x")
        env.update(
            CORNUCOPIA_ENV=values["environment"],
            NATS_URL=values["nats"]["url"],
            NATS_STREAM_REPLICAS=str(values["nats"]["streamReplicas"]),
            LOG_LEVEL=values["logLevel"],
            CORNUCOPIA_TOKEN_SECRET="a-secret-from-the-secret",
            MEMBERS_MASTER_KEYS=f"k1:{key}",
            MEMBERS_ACTIVE_KEY_ID="",
            MEMBERS_BLIND_INDEX_KEY=key,
        )
        if component["kind"] == "grpc":
            env[f"{name.upper()}_DATABASE_URL"] = f"postgresql://u:p@db/{name}"
        settings = Settings.from_env(name, env)
        assert settings.production
        assert settings.stream_replicas == values["nats"]["streamReplicas"]
        if name == "members":
            ring, _ = keys_from_env("MEMBERS", env, production=True)
            assert ring.active_id == "k1"


def test_every_grpc_component_runs_several_replicas_side_by_side(
    values: dict[str, Any],
) -> None:
    """Replicas share the outbox, the consumers and (notify) the queue of
    messages, each claiming what it works on; none needs to run alone, so
    none is pinned to one replica or to the Recreate strategy."""
    for name, component in values["components"].items():
        if component["kind"] != "grpc":
            continue
        assert component["replicas"] >= 2, name
        assert component["autoscaling"]["maxReplicas"] > 1, name
        assert component["strategy"].get("type", "RollingUpdate") == "RollingUpdate", name
        assert component["podDisruptionBudget"]["enabled"], name
        assert component["podDisruptionBudget"]["minAvailable"] == 1, name


def test_templates_use_only_values_that_exist(
    values: dict[str, Any], schema: dict[str, Any]
) -> None:
    component_keys = set(schema["definitions"]["component"]["properties"])
    for template in TEMPLATES.iterdir():
        text = template.read_text(encoding="utf-8")
        for path in re.findall(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", text):
            node: Any = values
            for part in path.strip(".").split("."):
                assert isinstance(node, dict) and part in node, f"{template.name}: .Values{path}"
                node = node[part]
        for field in re.findall(r"\$(?:component|c|p)\.([A-Za-z_][A-Za-z0-9_]*)", text):
            assert field in component_keys, f"{template.name}: component field {field}"


def test_every_secret_key_is_documented(values: dict[str, Any]) -> None:
    helpers = (TEMPLATES / "_helpers.tpl").read_text(encoding="utf-8")
    keys = set(re.findall(r'"key" "([a-z0-9-]+)"', helpers))
    keys |= {
        f"{name}-database-url" for name, c in values["components"].items() if c["kind"] == "grpc"
    }
    assert {"token-secret", "members-master-keys", "members-blind-index-key"} <= keys
    values_text = (CHART / "values.yaml").read_text(encoding="utf-8")
    operations = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    for key in sorted(keys):
        assert key in values_text, f"values.yaml does not document {key}"
        assert key in operations, f"docs/operations.md does not document {key}"


# -- the image -------------------------------------------------------------------------


def test_the_image_generates_stubs_for_every_proto_as_make_does() -> None:
    instructions = dockerfile_instructions()
    runs = [args for instruction, args in instructions if instruction == "RUN"]
    protoc = [r for r in runs if "grpc_tools.protoc" in r]
    assert len(protoc) == 1
    command = protoc[0]
    assert "-I protos" in command
    assert "--python_out=/app/gen" in command
    assert "--grpc_python_out=/app/gen" in command
    # Every .proto under protos/, found at build time as the Makefile does.
    assert "$(find protos -name '*.proto' | sort)" in command
    # protos/ is copied in before the stubs are generated from it.
    assert instructions.index(("COPY", "protos ./protos")) < instructions.index(("RUN", command))
    copies = [args for instruction, args in instructions if instruction == "COPY"]
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "PROTO_FILES := $(shell find protos -name '*.proto' | sort)" in makefile
    make_line = next(
        line for line in re.sub(r"\\\n", " ", makefile).splitlines() if "grpc_tools.protoc" in line
    )
    flags = shlex.split(make_line.split("grpc_tools.protoc", 1)[1])
    assert flags[-1] == "$(PROTO_FILES)"
    assert flags[:2] == ["-I", "protos"]
    assert "--python_out=gen" in flags and "--grpc_python_out=gen" in flags
    # -I protos makes each file's import path its path under protos/, which
    # must match its package for the absolute imports the code uses.
    protos = sorted((ROOT / "protos").rglob("*.proto"))
    assert protos
    for proto in protos:
        package = re.search(r"^package ([\w.]+);", proto.read_text(encoding="utf-8"), re.M)
        assert package is not None, proto
        relative = proto.parent.relative_to(ROOT / "protos")
        assert package.group(1) == ".".join(relative.parts), proto
    env = " ".join(args for instruction, args in instructions if instruction == "ENV")
    assert "PYTHONPATH=/app/gen:/app" in env
    assert "CORNUCOPIA_ENV=production" in env
    assert "/app/gen /app/gen" in " ".join(copies)


def test_the_image_runs_the_console_script_as_the_chart_user(values: dict[str, Any]) -> None:
    instructions = dockerfile_instructions()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    scripts = pyproject["project"]["scripts"]
    entrypoint = [json.loads(a) for i, a in instructions if i == "ENTRYPOINT"]
    cmd = [json.loads(a) for i, a in instructions if i == "CMD"]
    assert entrypoint == [["cornucopia"]]
    assert entrypoint[0][0] in scripts
    assert cmd == [["serve", "members"]]
    users = [a for i, a in instructions if i == "USER"]
    uid = values["podSecurityContext"]["runAsUser"]
    assert users == [f"{uid}:{values['podSecurityContext']['runAsGroup']}"]
    assert "python:3.11-slim" in DOCKERFILE.read_text(encoding="utf-8")
    assert pyproject["project"]["requires-python"].startswith(">=3.11")
    chart = (CHART / "Chart.yaml").read_text(encoding="utf-8")
    assert f'appVersion: "{pyproject["project"]["version"]}"' in chart
