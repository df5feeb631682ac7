"""Paradigms: what a retriever's representation of a text is, and everything that follows from it.

A paradigm is one class (chosen in `conf/paradigm/` by `_target_`) that says how hidden states are
pooled into a representation, how a query's representation scores passages' (the losses call it), how
representations are kept in host memory, stored in shards and searched, what its head costs in FLOPs
and memory, and its regulariser. Nothing outside these classes asks which paradigm a cell is: a new
one is a new subclass of `Paradigm` and its config file.
"""

from .base import Paradigm, Shapes, paradigm_of

__all__ = ["Paradigm", "Shapes", "paradigm_of"]
