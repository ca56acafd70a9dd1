"""The Xen driver: the agent touches Xen only through the `xl` command and XenStore."""

from xenha_agent.xen.xl import (
    Domain,
    DomainDetails,
    DomainNotFound,
    XenInfo,
    Xl,
    XlError,
    XlOutputError,
    XlTimeout,
)

__all__ = [
    "Domain",
    "DomainDetails",
    "DomainNotFound",
    "XenInfo",
    "Xl",
    "XlError",
    "XlOutputError",
    "XlTimeout",
]
