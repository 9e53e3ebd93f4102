"""The dsv4c version, in a module of its own: the package's modules read it from here rather than from
`dsv4c/__init__.py`, whose public API imports the compiler (an import of `dsv4c` from a compiler module would
make a cycle)."""

__version__ = "0.1.0"
