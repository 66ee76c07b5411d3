"""The op tests, one file per op module of ssae_kernels/ops.

A package, so that its conftest (the ``backend`` fixture, imported by the tests as
``from .conftest import ...``) is the module ``ops.conftest`` and leaves the name
``conftest`` to tests/conftest.py.
"""
