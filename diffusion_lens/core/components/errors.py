"""Attribute errors that reach the user with their advice intact."""

from __future__ import annotations


class KeepPropertyErrors:
    """Mixin for an `nn.Module` whose properties raise `AttributeError` with advice.

    Why: when a property raises `AttributeError`, Python retries `__getattr__`, and
    `nn.Module.__getattr__` replaces the message with "'X' object has no attribute 'W_in'". This
    mixin re-runs the property so its own message reaches the user (`hasattr` still works).

    Example:
        >>> moe_model.W_in
        AttributeError: Block 0 has a mixture-of-experts MLP, so there is no single W_in/W_gate/W_out;
        use model.blocks[0].mlp.experts[e] instead.
    """

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            attr = getattr(type(self), name, None)
            if isinstance(attr, property):
                return attr.fget(self)  # raises the property's own, informative AttributeError
            raise
