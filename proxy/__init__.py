__version__ = "0.1.0"

import native

native.guard()  # before the package's first compiled module loads (native.py)
