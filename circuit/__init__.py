import native

native.guard()  # before the package's first compiled module loads (native.py)
