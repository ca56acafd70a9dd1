"""The xenha node agent: drives xl and XenStore, relays checkpoints, fences and fails over."""
