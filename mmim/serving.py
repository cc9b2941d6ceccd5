"""Where models logged before the layered layout (mmim/registry/) find their pyfunc class.

A logged model carries a copy of its entry file, and the copies logged then import
`mmim.serving.MMIMPyfunc`. Registries keep such models as champions for as long as they
win, and gating scores them, so that name must keep resolving. New models are logged with
mmim/registry/pyfunc_entry.py.
"""

from mmim.registry.serving import MMIMPyfunc

__all__ = ["MMIMPyfunc"]
