"""Pydantic models of the xenha.io/v1alpha1 API: `XenReplication` and `XenNode`.

These models are the single source of the CRDs (`xenha.api.crd` generates them) and the
Python side's reading of every object. Python attributes are snake_case; the API spelling
(camelCase, `freeMemoryMiB`, `from`) is the alias, used for input and output alike.

Defaulting happens in two layers, as in `xl remus` itself:
- static defaults (`unsafe.allow: false`, `failover.leaseDurationSeconds: 2`, ...) live in
  the CRD schema too, so the API server stores them;
- mode-dependent defaults (checkpoint interval 200 ms and compression on, for Remus only)
  cannot be said in OpenAPI, so the CRD leaves them unset and its CEL rules reject the
  explicit values that conflict with COLO. Whoever acts on a spec (operator, agents) reads
  it through `XenReplicationSpec`, whose validation applies them.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Final, Literal, Self

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import InitErrorDetails, PydanticCustomError

from xenha.api.rules import broken_rules

GROUP: Final = "xenha.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = "xenha.io/v1alpha1"

REMUS_DEFAULT_INTERVAL_MS = 200
"""`xl remus` checkpoints every 200 ms unless told otherwise (`-i`)."""

# A Xen domain name as xl handles it: starts alphanumeric, then a conservative charset
# that is safe in XenStore paths, log file names and shell-free argv.
DOMAIN_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
DOMAIN_MAX_LENGTH = 64
# RFC 1123 subdomain, what Kubernetes accepts as a node name.
NODE_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
NODE_MAX_LENGTH = 253
SCRIPT_PATTERN = r"^/\S+$"
SCRIPT_MAX_LENGTH = 1024

REJECT_UNKNOWN = "reject_unknown_fields"
"""Validation context key: reject unknown spec fields the way `kubectl apply` does."""

Timestamp = AwareDatetime
"""RFC 3339 with a zone; serialised as `...Z` for UTC."""


_API_NAMES = {"from_node": "from", "to_node": "to"}


def api_name(python_name: str) -> str:
    """The API spelling of a field: camelCase, `MiB` as written in docs/design.md, and
    `from`/`to` (Python keywords, hence `from_node`/`to_node` in Python)."""
    if python_name in _API_NAMES:
        return _API_NAMES[python_name]
    camel = to_camel(python_name)
    return f"{camel[:-3]}MiB" if camel.endswith("Mib") else camel


class ApiModel(BaseModel):
    """Base of every API model: camelCase on the wire, snake_case in Python.

    Aliases come from `api_name` only (no per-field `alias=`), so that type checkers see the
    Python names as the constructor's keywords.
    """

    model_config = ConfigDict(
        alias_generator=api_name,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        # Tolerant reader: an older agent must survive fields a newer operator writes.
        extra="ignore",
    )

    def to_api(self) -> dict[str, Any]:
        """The object as the API stores it: camelCase keys, unset fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def _nested_default(factory: type[BaseModel], description: str) -> Any:
    """Field options for an optional sub-object whose own fields carry the defaults.

    `default: {}` in the CRD makes the API server materialise the inner defaults too, so
    `kubectl get -o yaml` shows the effective settings.
    """
    return Field(
        default_factory=factory, description=description, json_schema_extra={"default": {}}
    )


class SpecModel(ApiModel):
    """Base of the spec models: unknown fields are an error when the context asks for it."""

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_fields(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, Mapping) or not (info.context or {}).get(REJECT_UNKNOWN):
            return data
        known = {field.alias or name for name, field in cls.model_fields.items()}
        unknown = sorted(str(key) for key in data if key not in known)
        if not unknown:
            return data
        raise ValidationError.from_exception_data(
            cls.__name__,
            [
                InitErrorDetails(
                    type=PydanticCustomError(
                        "unknown_field", 'unknown field "{field}"', {"field": key}
                    ),
                    loc=(key,),
                    input=data[key],
                )
                for key in unknown
            ],
        )


# --------------------------------------------------------------------------------------------
# XenReplication.spec


class Mode(StrEnum):
    """Which replication `xl remus` runs."""

    COLO = "colo"
    REMUS = "remus"


class CheckpointSpec(SpecModel):
    interval_ms: Annotated[StrictInt, Field(ge=20, le=60000)] | None = Field(
        default=None,
        description=(
            "Milliseconds between checkpoints (xl remus -i). Remus only; defaults to 200. "
            "COLO checkpoints on demand and rejects this field."
        ),
    )
    compression: StrictBool | None = Field(
        default=None,
        description=(
            "Compress memory checkpoints (false = xl remus -u). Defaults to true for Remus "
            "and false for COLO, which cannot compress (true is rejected)."
        ),
    )


class UnsafeSpec(SpecModel):
    allow: StrictBool = Field(
        default=False,
        description="Allow unsafe configurations (xl remus -F); needed by the three below.",
    )
    blackhole: StrictBool = Field(
        default=False,
        description=(
            "Send checkpoints to /dev/null (xl remus -b): no replica at all, for debugging. "
            "Needs allow; Remus only."
        ),
    )
    disable_network_buffering: StrictBool = Field(
        default=False,
        description=(
            "Release network output before its checkpoint reaches the replica (xl remus -n). "
            "Needs allow; Remus only."
        ),
    )
    disable_disk_replication: StrictBool = Field(
        default=False,
        description="Do not replicate disks (xl remus -d). Needs allow; Remus only.",
    )


class ColoSpec(SpecModel):
    userspace_proxy: StrictBool = Field(
        default=False,
        description="Use the userspace COLO proxy (xl remus -p). COLO only.",
    )


class FailoverSpec(SpecModel):
    automatic: StrictBool = Field(
        default=True,
        description="Activate the standby by itself when the active host is lost.",
    )
    lease_duration_seconds: Annotated[StrictInt, Field(ge=1, le=60)] = Field(
        default=2,
        description=(
            "How long the standby must see no renewal of the active host's lease before it "
            "may take over; the active side fences itself before that."
        ),
    )


class XenReplicationSpec(SpecModel):
    """What the user asks for. Validating it applies every rule and every default."""

    domain: Annotated[
        StrictStr, Field(min_length=1, max_length=DOMAIN_MAX_LENGTH, pattern=DOMAIN_PATTERN)
    ] = Field(description="Name of the Xen domain to protect, as xl lists it on primaryNode.")
    mode: Mode = Field(
        description="colo (xl remus -c: both copies run, outputs compared) or remus."
    )
    primary_node: Annotated[
        StrictStr, Field(min_length=1, max_length=NODE_MAX_LENGTH, pattern=NODE_PATTERN)
    ] = Field(description="Kubernetes node where the domain runs when replication starts.")
    secondary_node: Annotated[
        StrictStr, Field(min_length=1, max_length=NODE_MAX_LENGTH, pattern=NODE_PATTERN)
    ] = Field(description="Kubernetes node that holds the replica; must differ from primaryNode.")
    checkpoint: CheckpointSpec = _nested_default(CheckpointSpec, "How checkpoints are taken.")
    unsafe: UnsafeSpec = _nested_default(
        UnsafeSpec, "Unsafe settings for debugging and benchmarks; each weakens protection."
    )
    network_buffer_script: (
        Annotated[StrictStr, Field(max_length=SCRIPT_MAX_LENGTH, pattern=SCRIPT_PATTERN)] | None
    ) = Field(
        default=None,
        description=(
            "Absolute path of the script xl runs to set up output buffering (xl remus -N): "
            "Remus network buffering (default /etc/xen/scripts/remus-netbuf-setup) or, for "
            "COLO, the proxy script on both hosts (default /etc/xen/scripts/colo-proxy-setup)."
        ),
    )
    colo: ColoSpec = _nested_default(ColoSpec, "COLO-only settings.")
    failover: FailoverSpec = _nested_default(FailoverSpec, "When and how the standby takes over.")
    suspended: StrictBool = Field(
        default=False,
        description="Stop replicating (the domain keeps running unprotected) until set false.",
    )

    @model_validator(mode="after")
    def _check_rules_then_default_by_mode(self) -> Self:
        broken = broken_rules(self)
        if broken:
            wire = self.model_dump(by_alias=True)
            raise ValidationError.from_exception_data(
                type(self).__name__,
                [
                    InitErrorDetails(
                        type=PydanticCustomError("xenha_rule", rule.message),
                        loc=tuple(rule.field.split(".")),
                        input=_lookup(wire, rule.field),
                    )
                    for rule in broken
                ],
            )
        defaults: dict[str, Any] = {}
        if self.checkpoint.compression is None:
            # As libxl: compression = !colo.
            defaults["compression"] = self.mode is Mode.REMUS
        if self.mode is Mode.REMUS and self.checkpoint.interval_ms is None:
            defaults["interval_ms"] = REMUS_DEFAULT_INTERVAL_MS
        if defaults:
            # A copy, so a CheckpointSpec the caller passed in is never changed under them.
            self.checkpoint = self.checkpoint.model_copy(update=defaults)
        return self


def _lookup(data: Mapping[str, Any], path: str) -> Any:
    value: Any = data
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def parse_spec(raw: Mapping[str, Any], *, reject_unknown: bool = False) -> XenReplicationSpec:
    """Validate a `spec` mapping (API spelling) and apply all defaults, mode-dependent ones too.

    Raises `pydantic.ValidationError` naming the field and the rule. `reject_unknown=True`
    treats unknown fields as errors, like `kubectl apply`; readers of stored objects keep the
    default so that a newer CRD's fields do not break an older reader.
    """
    return XenReplicationSpec.model_validate(raw, context={REJECT_UNKNOWN: reject_unknown})


# --------------------------------------------------------------------------------------------
# XenReplication.status (written by the operator only)


class Phase(StrEnum):
    PENDING = "Pending"
    SEEDING = "Seeding"
    PROTECTED = "Protected"
    DEGRADED = "Degraded"
    FAILING_OVER = "FailingOver"
    SUSPENDED = "Suspended"
    FAILED = "Failed"


class ConditionType(StrEnum):
    """The condition types the operator maintains on every XenReplication."""

    READY = "Ready"
    PROTECTED = "Protected"


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(ApiModel):
    """A Kubernetes condition (the shape of metav1.Condition)."""

    type: str = Field(
        min_length=1,
        max_length=316,
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
        description="Ready or Protected (CamelCase).",
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(
        min_length=1,
        max_length=1024,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        description="Why, in CamelCase, for machines (e.g. LostConnection).",
    )
    message: str = Field(max_length=32768, description="Why, for people; may be empty.")
    last_transition_time: Timestamp = Field(description="When status last changed.")
    observed_generation: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="The spec generation the condition was computed from."
    )


class FailoverRecord(ApiModel):
    """One activation of a standby: who took over from whom, when, why, how fast."""

    time: Timestamp = Field(description="When the standby activated.")
    from_node: str = Field(description="The node that was active.")
    to_node: str = Field(description="The node that took over.")
    reason: str | None = Field(default=None, description="CamelCase cause, e.g. NodeLost.")
    duration_ms: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="From losing the peer to the guest running on the new node."
    )


class SwitchoverState(StrEnum):
    REQUESTED = "Requested"
    IN_PROGRESS = "InProgress"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class Switchover(ApiModel):
    """A planned move of the active copy to the standby host."""

    target: str = Field(description="The node that is to become active.")
    state: SwitchoverState = Field(description="Requested, InProgress, Succeeded or Failed.")
    time: Timestamp | None = Field(default=None, description="When state last changed.")
    message: str | None = Field(default=None, description="Detail for people.")


class XenReplicationStatus(ApiModel):
    """What the operator observed. Agents read activeNode, standbyNode and phase."""

    phase: Phase | None = Field(
        default=None,
        description="Pending, Seeding, Protected, Degraded, FailingOver, Suspended or Failed.",
    )
    message: str | None = Field(default=None, description="Why the phase is what it is.")
    active_node: str | None = Field(
        default=None, description="The node whose copy runs and serves (the xl remus side)."
    )
    standby_node: str | None = Field(
        default=None,
        description="The node that receives checkpoints; empty means no replication.",
    )
    lease_holder: str | None = Field(
        default=None, description="holderIdentity of the fencing Lease: the node allowed to run."
    )
    protected_since: Timestamp | None = Field(
        default=None, description="When the current period of protection began."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready and Protected, by Kubernetes conventions.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="The spec generation this status describes."
    )
    last_checkpoint_time: Timestamp | None = Field(
        default=None, description="When the standby last completed a checkpoint."
    )
    checkpoints_total: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="Checkpoints completed since replication (re)started."
    )
    checkpoint_interval_ms: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="Observed milliseconds between recent checkpoints."
    )
    last_pause_ms: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="How long the guest was paused for the last checkpoint."
    )
    bytes_per_second: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="Replication stream throughput, recent average."
    )
    last_failover: FailoverRecord | None = Field(
        default=None, description="The most recent failover."
    )
    switchover: Switchover | None = Field(
        default=None, description="The current or last planned switchover."
    )


class XenReplication(ApiModel):
    """A whole `XenReplication` object."""

    api_version: Literal["xenha.io/v1alpha1"] = API_VERSION
    kind: Literal["XenReplication"] = "XenReplication"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: XenReplicationSpec
    status: XenReplicationStatus | None = None


# --------------------------------------------------------------------------------------------
# XenNode (cluster-scoped; status written by that node's agent only)


class XenInfo(ApiModel):
    version: str | None = Field(default=None, description="Xen version, e.g. 4.17.")
    free_memory_mib: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="Memory free for new domains."
    )
    total_memory_mib: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="Host memory."
    )
    colo_supported: bool | None = Field(
        default=None, description="Whether this host can run COLO (HVM, QEMU, proxy)."
    )


class DomainInfo(ApiModel):
    name: str = Field(description="Domain name as xl lists it.")
    domid: Annotated[int, Field(ge=0)] | None = Field(default=None, description="Domain id.")
    state: str | None = Field(default=None, description="running, paused, ... as xl says.")
    memory_mib: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="Memory of the domain."
    )


class ReplicationRole(StrEnum):
    PRIMARY = "primary"
    SECONDARY = "secondary"


class ReplicationState(StrEnum):
    STARTING = "Starting"
    SEEDING = "Seeding"
    REPLICATING = "Replicating"
    DEGRADED = "Degraded"
    ACTIVATING = "Activating"
    ACTIVE = "Active"
    STOPPING = "Stopping"
    STOPPED = "Stopped"
    FENCED = "Fenced"
    FAILED = "Failed"


class CheckpointStats(ApiModel):
    total: Annotated[int, Field(ge=0)] | None = Field(default=None, description="Checkpoints.")
    last_time: Timestamp | None = Field(default=None, description="Last complete checkpoint.")
    interval_ms: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="Observed milliseconds between checkpoints."
    )
    last_pause_ms: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="Guest pause of the last checkpoint."
    )
    last_bytes: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="Size of the last checkpoint."
    )
    bytes_per_second: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="Stream throughput."
    )


class NodeReplication(ApiModel):
    """This node's part in one XenReplication."""

    namespace: str = Field(description="Namespace of the XenReplication.")
    name: str = Field(description="Name of the XenReplication.")
    uid: str | None = Field(default=None, description="UID of the XenReplication.")
    role: ReplicationRole = Field(description="primary (xl remus) or secondary (receiver).")
    state: ReplicationState = Field(description="Where this node's replicator is.")
    domid: Annotated[int, Field(ge=0)] | None = Field(default=None, description="Local domid.")
    peer_connected: bool | None = Field(default=None, description="Relay link to the peer up.")
    last_heartbeat_time: Timestamp | None = Field(
        default=None, description="Last heartbeat seen from the peer."
    )
    checkpoints: CheckpointStats | None = Field(default=None, description="Stream statistics.")
    message: str | None = Field(default=None, description="Detail for people.")
    reason: str | None = Field(
        default=None, description="CamelCase reason, e.g. LostConnection, ColoUnsupported."
    )
    failover: FailoverRecord | None = Field(
        default=None,
        description="Set by the node that activated, kept until the operator has seen it.",
    )


class XenNodeSpec(SpecModel):
    """Empty: a XenNode is pure observation."""


class XenNodeStatus(ApiModel):
    heartbeat_time: Timestamp | None = Field(
        default=None, description="Time of the agent's last report (every 2 s and on change)."
    )
    agent_version: str | None = Field(default=None, description="xenha agent version.")
    relay_endpoint: str | None = Field(
        default=None, description="host:port where peers dial this node's relay (TLS)."
    )
    xen: XenInfo | None = Field(default=None, description="The hypervisor on this node.")
    domains: list[DomainInfo] = Field(default_factory=list, description="Domains on this node.")
    replications: list[NodeReplication] = Field(
        default_factory=list, description="One entry per XenReplication this node takes part in."
    )


class XenNode(ApiModel):
    """A whole `XenNode` object; its name is the Kubernetes node name."""

    api_version: Literal["xenha.io/v1alpha1"] = API_VERSION
    kind: Literal["XenNode"] = "XenNode"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: XenNodeSpec = Field(default_factory=XenNodeSpec)
    status: XenNodeStatus | None = None


__all__ = [
    "API_VERSION",
    "GROUP",
    "REMUS_DEFAULT_INTERVAL_MS",
    "VERSION",
    "ApiModel",
    "CheckpointSpec",
    "CheckpointStats",
    "ColoSpec",
    "Condition",
    "ConditionStatus",
    "ConditionType",
    "DomainInfo",
    "FailoverRecord",
    "FailoverSpec",
    "Mode",
    "NodeReplication",
    "Phase",
    "ReplicationRole",
    "ReplicationState",
    "Switchover",
    "SwitchoverState",
    "UnsafeSpec",
    "XenInfo",
    "XenNode",
    "XenNodeSpec",
    "XenNodeStatus",
    "XenReplication",
    "XenReplicationSpec",
    "XenReplicationStatus",
    "parse_spec",
]
