"""A generator of provider-like schemas: thousands of resource types, nested types, descriptions.

The shape follows a Pulumi provider schema (the kind of document a cloud provider ships,
about 100 MiB for the largest ones)::

    {"name": "aws", "displayName": ..., "version": ..., "description": ..., "config": {...},
     "types": {"aws:s3/BucketVersioning:BucketVersioning": {"description": ..., "properties": {...},
                                                            "required": [...], "type": "object"}, ...},
     "resources": {"aws:s3/bucket:Bucket": {"description": ..., "properties": {...}, "required": [...],
                                            "inputProperties": {...}, "requiredInputs": [...]}, ...}}

Properties are ``string``/``number``/``integer``/``boolean``, arrays and maps of those,
``$ref`` to a nested type, or arrays and maps of nested types. Generation is
deterministic for a seed and prefix-stable (a smaller size gives a prefix of the same
types), and fast: the JSON is written as text pieces, descriptions are slices of one
pre-built word corpus, and no parsed document is ever held.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

from .blob import (
    KIND_OBJECT,
    KIND_RESOURCE,
    T_ANY,
    T_ARRAY,
    T_BOOLEAN,
    T_INTEGER,
    T_MAP,
    T_NUMBER,
    T_OBJECT,
    T_STRING,
    DocumentWriter,
    PropSpec,
)

__all__ = ["generate_blob", "generate_schema", "parse_size"]

Progress = Callable[[str, float], None]
"""``progress(stage, fraction)``: stage is ``"generating"`` or ``"indexing"``; fraction in [0, 1]."""

MODULES = (
    "acm accessanalyzer amp apigateway apigatewayv2 appautoscaling appconfig appflow appmesh apprunner "
    "appstream appsync athena autoscaling backup batch bedrock budgets cloud9 cloudformation cloudfront "
    "cloudhsmv2 cloudtrail cloudwatch codeartifact codebuild codecommit codedeploy codepipeline cognito "
    "comprehend config connect datasync dax detective devicefarm directconnect dlm dms docdb dynamodb ebs "
    "ec2 ec2transitgateway ecr ecs efs eks elasticache elasticbeanstalk elasticsearch elb elbv2 emr "
    "evidently finspace firehose fms fsx gamelift glacier globalaccelerator glue grafana guardduty iam "
    "imagebuilder inspector iot ivs kafka kendra keyspaces kinesis kms lakeformation lambda lex lightsail "
    "location macie mediaconvert medialive memorydb mq neptune networkfirewall networkmanager oam "
    "opensearch organizations pinpoint pipes qldb quicksight ram rds redshift resourcegroups route53 "
    "rum s3 s3control sagemaker scheduler secretsmanager securityhub servicecatalog servicediscovery ses "
    "sfn shield signer sns sqs ssm ssoadmin storagegateway swf synthetics timestream transfer verifiedaccess "
    "vpc vpclattice waf wafv2 workspaces xray"
).split()

NOUNS = (
    "Bucket Policy Access Point Rule Group Role User Key Alias Function Layer Permission Queue Topic "
    "Subscription Table Index Stream Cluster Instance Parameter Snapshot Endpoint Gateway Route Target "
    "Listener Certificate Domain Record Zone Vpc Subnet Peering Attachment Association Configuration "
    "Replication Lifecycle Notification Inventory Analytics Metric Alarm Dashboard Log Filter Destination "
    "Pipeline Project Repository Deployment Application Environment Version Template Stack Set Share "
    "Account Organization Unit Profile Connection Link Volume Image Launch Scaling Schedule Plan Vault "
    "Secret Rotation Grant Registry Schema Job Trigger Workflow Crawler Catalog Database Partition Model "
    "Workgroup Namespace Service Task Capacity Provider Mount File System Lock Object Ownership Website "
    "Cors Encryption Logging Tagging Accelerate Request Payment Intelligent Tiering Acl Control Block "
    "Public Owner Member Invitation Detector Finding Report Budget Action Channel Broker Node Flow Mesh "
    "Router Virtual Secondary Primary Global Regional Custom Managed Default Shared Network Firewall"
).split()

PROP_WORDS = (
    "name description enabled status arn id kms key id bucket prefix suffix tags tag value type mode "
    "retention days period interval timeout memory size count max min desired capacity port protocol "
    "path source destination target action effect principal resource condition policy role arn "
    "region zone availability subnet security group vpc cidr block ipv6 address endpoint url uri "
    "version engine family class storage encrypted iops throughput snapshot backup window maintenance "
    "log level format compression expiration transition filter rule priority weight threshold "
    "evaluation alarm metric namespace statistic unit dimension schedule expression cron rate batch "
    "concurrency reserved provisioned handler runtime layer environment variables image uri command "
    "entry point working directory user group owner account organization deletion protection force "
    "destroy skip final identifier tier auto minor upgrade apply immediately multi az public access "
    "accessible replica allowed origins methods headers exposed age seconds redirect hostname"
).split()

WORDS = (
    "the a an of to and or for in on with by from at as is are be can must may should when which "
    "this that if not all any each resource resources provider configuration value values default "
    "specified set setting settings enables disables controls determines identifies whether used "
    "use using create update delete replace changes change force new existing current amazon aws "
    "service bucket object objects policy role account region availability zone network traffic "
    "request requests response encryption key keys access permissions identity principal tags tag "
    "map list string number boolean true false valid values include including required optional "
    "minimum maximum length characters seconds minutes hours days retention period version versions "
    "state status enabled disabled data source attribute attributes argument arguments reference "
    "documentation see more information about note only one block blocks nested supports following "
    "example usage import imported using the id name arn cluster instance instances endpoint port "
    "protocol storage capacity limit limits quota throughput latency log logs logging metric metrics "
    "alarm notification event events rule rules target targets filter filters pattern patterns"
).split()

_CORPUS_WORDS = 400_000


class _Corpus:
    """A long run of description text, sliced at word boundaries (JSON-safe: no quotes or backslashes to escape)."""

    def __init__(self, rnd: random.Random) -> None:
        words = WORDS
        out: list[str] = []
        sentence = 0
        for _ in range(_CORPUS_WORDS):
            w = words[int(rnd.random() * len(words))]
            out.append(w)
            sentence += 1
            if sentence > 8 and rnd.random() < 0.12:
                out[-1] = w + ("." if rnd.random() < 0.8 else ",")
                sentence = 0
                if rnd.random() < 0.05:
                    out.append("\\n\\n")  # a JSON-escaped paragraph break: two characters, each escaped
        text = " ".join(out)
        self.text = text
        starts = [0]
        pos = 0
        for w in out[:-1]:
            pos += len(w) + 1
            starts.append(pos)
        self.starts = starts

    def take(self, rnd: random.Random, n_words: int) -> str:
        starts = self.starts
        i = int(rnd.random() * (len(starts) - n_words - 1))
        return self.text[starts[i] : starts[i + n_words] - 1]


def _camel(pascal: str) -> str:
    return pascal[0].lower() + pascal[1:]


class _Generator:
    def __init__(self, seed: int, provider: str) -> None:
        self.rnd = random.Random(seed)
        self.provider = provider
        self.corpus = _Corpus(random.Random(seed ^ 0x5EED))
        self.used: set[str] = set()

    def description(self, lo: int, hi: int) -> str:
        rnd = self.rnd
        return self.corpus.take(rnd, lo + int(rnd.random() * (hi - lo)))

    def pascal(self, k: int) -> str:
        rnd = self.rnd
        return "".join(NOUNS[int(rnd.random() * len(NOUNS))] for _ in range(k))

    def prop_name(self, taken: set[str]) -> str:
        rnd = self.rnd
        for attempt in range(50):
            k = 1 + int(rnd.random() * (2 if attempt < 20 else 4))
            parts = [PROP_WORDS[int(rnd.random() * len(PROP_WORDS))] for _ in range(k)]
            name = parts[0] + "".join(p.capitalize() for p in parts[1:])
            if name not in taken:
                taken.add(name)
                return name
        name = f"property{len(taken)}"
        taken.add(name)
        return name

    def prop(self, name: str, nested: list[str]) -> tuple[str, PropSpec]:
        """The JSON text of one property and its index entry; may refer to a nested type."""
        rnd = self.rnd
        r = rnd.random()
        desc = self.description(8, 110)
        ref: str | None = None
        if name == "tags":
            kind, item = T_MAP, T_STRING
        elif nested and r < 0.14:
            ref = nested[int(rnd.random() * len(nested))]
            kind, item = (
                (T_OBJECT, 0)
                if rnd.random() < 0.6
                else ((T_ARRAY, T_OBJECT) if rnd.random() < 0.8 else (T_MAP, T_OBJECT))
            )
        elif r < 0.55:
            kind, item = T_STRING, 0
        elif r < 0.70:
            kind, item = T_BOOLEAN, 0
        elif r < 0.80:
            kind, item = T_INTEGER, 0
        elif r < 0.84:
            kind, item = T_NUMBER, 0
        elif r < 0.93:
            kind, item = T_ARRAY, T_STRING if rnd.random() < 0.8 else T_INTEGER
        elif r < 0.98:
            kind, item = T_MAP, T_STRING
        else:
            kind, item = T_ANY, 0
        text = "{" + _type_text(kind, item, ref, self.provider) + ',"description":"' + desc + '"'
        if rnd.random() < 0.05:
            text += ',"willReplaceOnChanges":true'
        text += "}"
        return json.dumps(name) + ":" + text, (name, kind, item, ref, False)

    def fixed_props(
        self, fields: list[tuple[str, int, int, str | None]], module: str
    ) -> tuple[str, list[PropSpec]]:
        """The JSON text and index entries of hand-shaped properties (nested types by name, in ``module``)."""
        pieces, specs = [], []
        for name, kind, item, nested in fields:
            ref = f"{self.provider}:{module}/{nested}:{nested}" if nested else None
            pieces.append(
                json.dumps(name)
                + ":{"
                + _type_text(kind, item, ref, self.provider)
                + ',"description":"'
                + self.description(8, 60)
                + '"}'
            )
            specs.append((name, kind, item, ref, False))
        return "{" + ",".join(pieces) + "}", specs

    def canonical(
        self,
    ) -> tuple[list[tuple[str, str, list[PropSpec]]], list[tuple[str, str, list[PropSpec]]]]:
        """The well-known resources (and their nested types) every schema starts with."""
        types, resources = [], []
        for path, fields, nested in CANONICAL:
            module, rest = path.split("/", 1)
            pascal = rest.split(":", 1)[1]
            for name, nfields in nested.items():
                token = f"{self.provider}:{module}/{name}:{name}"
                body, specs = self.fixed_props(nfields, module)
                text = (
                    '{"description":"'
                    + self.description(10, 80)
                    + '","properties":'
                    + body
                    + ',"type":"object"}'
                )
                types.append((token, text, specs))
                self.used.add(token)
            token = f"{self.provider}:{path}"
            body, specs = self.fixed_props(fields, module)
            text = (
                '{"description":"Provides a '
                + pascal
                + " resource. "
                + self.description(60, 900)
                + '","properties":'
                + body
                + ',"required":[],"inputProperties":'
                + body
                + ',"requiredInputs":[]}'
            )
            resources.append((token, text, specs))
            self.used.add(token)
        return types, resources

    def props(
        self, n: int, nested: list[str], extra: tuple[str, ...] = (), taken: set[str] | None = None
    ) -> tuple[str, list[PropSpec], list[str]]:
        taken = set() if taken is None else taken
        pieces = []
        specs = []
        names = list(extra)
        taken.update(extra)
        names += [self.prop_name(taken) for _ in range(n)]
        for name in names:
            text, spec = self.prop(name, nested)
            pieces.append(text)
            specs.append(spec)
        required = [s[0] for s in specs if s[0] != "tags" and self.rnd.random() < 0.15]
        specs = [(s[0], s[1], s[2], s[3], s[0] in required) for s in specs]
        return "{" + ",".join(pieces) + "}", specs, required

    def resource(self) -> tuple[list[tuple[str, str, list[PropSpec]]], tuple[str, str, list[PropSpec]]]:
        """Nested object types and one resource: (token, JSON text, index entries)."""
        rnd = self.rnd
        module = MODULES[int(rnd.random() * len(MODULES))]
        for attempt in range(100):
            pascal = self.pascal(1 + int(rnd.random() * (2 if attempt < 30 else 4)))
            token = f"{self.provider}:{module}/{_camel(pascal)}:{pascal}"
            if token not in self.used:
                break
        else:  # pragma: no cover - 100 collisions in a row
            pascal = f"{self.pascal(3)}{len(self.used)}"
            token = f"{self.provider}:{module}/{_camel(pascal)}:{pascal}"
        self.used.add(token)
        nested_types: list[tuple[str, str, list[PropSpec]]] = []
        n_nested = int(rnd.random() * 5)
        nested_tokens: list[str] = []
        # Built last to first, so a nested type only refers to types built before it (no cycles).
        for _ in range(n_nested):
            name = pascal + self.pascal(1)
            t = f"{self.provider}:{module}/{name}:{name}"
            if t in self.used:
                continue
            self.used.add(t)
            body, specs, required = self.props(2 + int(rnd.random() * 10), nested_tokens[-2:])
            text = (
                '{"description":"'
                + self.description(10, 80)
                + '","properties":'
                + body
                + ',"required":'
                + json.dumps(required, separators=(",", ":"))
                + ',"type":"object"}'
            )
            nested_types.append((t, text, specs))
            nested_tokens.append(t)
        n_props = 4 + int(rnd.random() * 30)
        taken = {"arn"}
        inputs, specs, required = self.props(
            n_props, nested_tokens, extra=("tags",) if rnd.random() < 0.6 else (), taken=taken
        )
        extra_outputs, _, _ = self.props(2, [], extra=("arn",), taken=taken)
        # Outputs: the inputs again plus a few output-only properties (an ARN, computed values).
        outputs_all = inputs[:-1] + ("," if len(inputs) > 2 else "") + extra_outputs[1:]
        text = (
            '{"description":"Provides a '
            + pascal
            + " resource. "
            + self.description(60, 900)
            + '","properties":'
            + outputs_all
            + ',"required":'
            + json.dumps(["arn", *required], separators=(",", ":"))
            + ',"inputProperties":'
            + inputs
            + ',"requiredInputs":'
            + json.dumps(required, separators=(",", ":"))
            + "}"
        )
        return nested_types, (token, text, specs)


# Well-known resources, shaped by hand, that every generated schema starts with (so examples
# such as an S3 bucket with versioning and lifecycle rules read naturally). Properties:
# (name, type, item type, nested type name or None). "{p}" is the provider.
_S, _N, _I, _B, _A, _M, _O = T_STRING, T_NUMBER, T_INTEGER, T_BOOLEAN, T_ARRAY, T_MAP, T_OBJECT
CANONICAL: tuple[
    tuple[str, list[tuple[str, int, int, str | None]], dict[str, list[tuple[str, int, int, str | None]]]], ...
] = (
    (
        "s3/bucket:Bucket",
        [
            ("bucket", _S, 0, None),
            ("acl", _S, 0, None),
            ("forceDestroy", _B, 0, None),
            ("tags", _M, _S, None),
            ("versioning", _O, 0, "BucketVersioning"),
            ("lifecycleRules", _A, _O, "BucketLifecycleRule"),
            ("website", _O, 0, "BucketWebsite"),
            ("corsRules", _A, _O, "BucketCorsRule"),
            ("policy", _S, 0, None),
        ],
        {
            "BucketVersioning": [("enabled", _B, 0, None), ("mfaDelete", _B, 0, None)],
            "BucketLifecycleRule": [
                ("id", _S, 0, None),
                ("enabled", _B, 0, None),
                ("prefix", _S, 0, None),
                ("expiration", _O, 0, "BucketLifecycleRuleExpiration"),
                ("tags", _M, _S, None),
            ],
            "BucketLifecycleRuleExpiration": [
                ("days", _I, 0, None),
                ("date", _S, 0, None),
                ("expiredObjectDeleteMarker", _B, 0, None),
            ],
            "BucketWebsite": [("indexDocument", _S, 0, None), ("errorDocument", _S, 0, None)],
            "BucketCorsRule": [
                ("allowedMethods", _A, _S, None),
                ("allowedOrigins", _A, _S, None),
                ("maxAgeSeconds", _I, 0, None),
            ],
        },
    ),
    (
        "iam/role:Role",
        [
            ("name", _S, 0, None),
            ("assumeRolePolicy", _S, 0, None),
            ("description", _S, 0, None),
            ("maxSessionDuration", _I, 0, None),
            ("managedPolicyArns", _A, _S, None),
            ("tags", _M, _S, None),
            ("inlinePolicies", _A, _O, "RoleInlinePolicy"),
        ],
        {"RoleInlinePolicy": [("name", _S, 0, None), ("policy", _S, 0, None)]},
    ),
    (
        "ec2/instance:Instance",
        [
            ("ami", _S, 0, None),
            ("instanceType", _S, 0, None),
            ("subnetId", _S, 0, None),
            ("vpcSecurityGroupIds", _A, _S, None),
            ("associatePublicIpAddress", _B, 0, None),
            ("tags", _M, _S, None),
            ("rootBlockDevice", _O, 0, "InstanceRootBlockDevice"),
            ("cpuCoreCount", _I, 0, None),
        ],
        {
            "InstanceRootBlockDevice": [
                ("volumeSize", _I, 0, None),
                ("volumeType", _S, 0, None),
                ("encrypted", _B, 0, None),
                ("iops", _I, 0, None),
                ("throughput", _N, 0, None),
            ]
        },
    ),
    (
        "lambda/function:Function",
        [
            ("role", _S, 0, None),
            ("handler", _S, 0, None),
            ("runtime", _S, 0, None),
            ("memorySize", _I, 0, None),
            ("timeout", _I, 0, None),
            ("environment", _O, 0, "FunctionEnvironment"),
            ("layers", _A, _S, None),
            ("tags", _M, _S, None),
        ],
        {"FunctionEnvironment": [("variables", _M, _S, None)]},
    ),
)


def _type_text(kind: int, item: int, ref: str | None, provider: str) -> str:
    def one(k: int, r: str | None) -> str:
        if k == T_OBJECT:
            return '"$ref":"#/types/' + (r or "") + '"'
        if k == T_ANY:
            return '"$ref":"pulumi.json#/Any"'
        return (
            '"type":"'
            + {T_STRING: "string", T_NUMBER: "number", T_INTEGER: "integer", T_BOOLEAN: "boolean"}[k]
            + '"'
        )

    if kind == T_ARRAY:
        return '"type":"array","items":{' + one(item, ref) + "}"
    if kind == T_MAP:
        return '"type":"object","additionalProperties":{' + one(item, ref) + "}"
    return one(kind, ref)


def _generate(size_bytes: int, seed: int, provider: str, progress: Progress | None) -> DocumentWriter:
    if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) or size_bytes <= 0:
        raise ValueError(f"size_bytes must be a positive int, got {size_bytes!r}")
    gen = _Generator(seed, provider)
    head = json.dumps(
        {
            "name": provider,
            "displayName": provider.upper(),
            "version": "6.0.0-synthetic",
            "description": "A synthetic provider schema generated by wasmshare (seed " + str(seed) + ").",
            "config": {
                "variables": {
                    "region": {"type": "string", "description": "The region to manage resources in."}
                }
            },
        },
        separators=(",", ":"),
    )[:-1]
    types, resources = gen.canonical()
    total = len(head) + 64 + sum(len(t[0]) + len(t[1]) + 4 for t in (*types, *resources))
    next_report = 0
    while total < size_bytes:
        nested, resource = gen.resource()
        types.extend(nested)
        resources.append(resource)
        total += sum(len(t[0]) + len(t[1]) + 4 for t in nested) + len(resource[0]) + len(resource[1]) + 4
        if progress is not None and total >= next_report:
            progress("generating", min(1.0, total / size_bytes))
            next_report = total + size_bytes // 100
    writer = DocumentWriter(head)
    writer.open_section("types")
    for token, text, specs in types:
        writer.add(KIND_OBJECT, token, text, specs)
    writer.close_section()
    writer.open_section("resources")
    for token, text, specs in resources:
        writer.add(KIND_RESOURCE, token, text, specs)
    writer.close_section()
    if progress is not None:
        progress("generating", 1.0)
    return writer


def generate_blob(
    size_bytes: int, *, seed: int = 0, provider: str = "aws", progress: Progress | None = None
) -> bytes:
    """Generate a provider schema of about ``size_bytes`` of JSON and return it as a blob (index included).

    Equal to ``build_blob(generate_schema(size_bytes, seed=seed))``, without parsing the
    document. Deterministic for a (size, seed, provider); time and memory grow linearly with the size.
    """
    return _generate(size_bytes, seed, provider, progress).finish("}", progress)


def generate_schema(
    size_bytes: int, *, seed: int = 0, provider: str = "aws", progress: Progress | None = None
) -> bytes:
    """Generate a provider schema of about ``size_bytes`` bytes of compact JSON (the document alone)."""
    writer = _generate(size_bytes, seed, provider, progress)
    writer.write("}")
    return "".join(writer.pieces).encode("ascii")


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
}


def parse_size(text: str) -> int:
    """``"100MiB"`` → 104857600; accepts B, KB/KiB, MB/MiB, GB/GiB (case-insensitive), decimals.

    Raises ValueError with the accepted forms.
    """
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ValueError(
            f"invalid size {text!r}: use a number with an optional unit, like 100MiB, 5MB or 2GiB"
        )
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"invalid size {text!r}: it must be more than 0 bytes")
    return value
