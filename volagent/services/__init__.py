"""Services: the agent's use cases, written against the ports only (never an adapter)."""
