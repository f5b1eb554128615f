"""The chaos soak: faults injected into real runs, and what must survive them."""
