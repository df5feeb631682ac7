"""retrieval-scaling: scaling studies of sparse and dense retrieval on decoder-only LLMs.

One module per concept: `identity` (what a cell is), `plan` (what it costs), `scheduler` (where it
runs), `cell` (what it does), `status` (where it stands). Verbs are `python -m retrieval_scaling.<verb>`.
"""

__version__ = "0.1.0"
