"""Load-balancing policies. Importing the package imports each policy module once, and each
registers itself (balancers.registry)."""

from balancers.registry import load_all

load_all()
