"""The xenha operator: decides roles, owns XenReplication status, issues TLS material."""
