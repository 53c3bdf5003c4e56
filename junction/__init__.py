"""Junction: sparse inference-time alignment of language models, served.

One import root. `junction.gateway` (the HTTP gateway and the decode loop),
`junction.services` (the model workers) and `junction.shared` (what both processes import)
serve; `junction.offline` (evaluate, diagnose, calibrate, train-value) is never imported by
them. `junction.cli` is the `junction` command.
"""

__version__ = "0.1.0"
