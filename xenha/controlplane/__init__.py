"""A real Kubernetes control plane for tests and the lab (etcd, kube-apiserver,
kube-controller-manager, plus kubectl and helm), built from pinned versions and cached.

``build`` makes the binaries, ``cluster`` runs them, ``rbac`` and ``nodes`` populate them.
"""

from xenha.controlplane.build import BuildError, MissingBinaryError
from xenha.controlplane.cluster import ControlPlane, ControlPlaneError

__all__ = ["BuildError", "ControlPlane", "ControlPlaneError", "MissingBinaryError"]
