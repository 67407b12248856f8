"""The interface version of ``energyc.runtime``, readable without importing torch.

Generated packages call into ``energyc.runtime`` (``from energyc import runtime as _rt``). Each
states ``energyc >= RUNTIME_VERSION`` in its header, with the value of the energyc that generated
it, and checks it at import (``energyc.runtime.require``), so that a package generated for a newer
runtime fails with a clear message instead of an ``AttributeError`` deep in a step function.

Raise it to the energyc version that ships a runtime change generated code relies on (a new
function, a changed signature or meaning); a change that keeps every call of older generated code
working leaves it as it is. It lives outside ``energyc/runtime/`` so that the compiler
(``energyc.render``) reads it without importing the runtime, which imports torch.
"""

RUNTIME_VERSION = "0.3.0"
