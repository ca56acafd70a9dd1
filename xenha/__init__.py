"""xenha: Xen Remus/COLO fault tolerance driven by Kubernetes."""

__version__ = "0.1.0"
