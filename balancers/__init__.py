"""Load-balancing policies. Importing the package imports each policy module once, and each
registers itself (balancers.registry)."""

import native

native.guard()  # before the package's first compiled module loads (native.py)

from balancers.registry import load_all  # noqa: E402

load_all()
