"""The built-in task kinds, one module each (see :mod:`q2lab.eval.registry`).

Importing this package registers them in the order of :data:`BUILTIN`, which is the order
:func:`~q2lab.eval.registry.kind_names` and error messages list them in.  A new built-in kind is
one module here that defines a :class:`~q2lab.eval.registry.TaskKind` with
``@register_kind``, plus its name in :data:`BUILTIN`.
"""

from __future__ import annotations

import importlib

#: Modules of the built-in kinds, in registration order (ppl_kld registers ppl, then kld).
BUILTIN = ("ppl_kld", "mc", "gen", "harness", "ifeval")

for _module in BUILTIN:
    importlib.import_module(f"{__name__}.{_module}")
