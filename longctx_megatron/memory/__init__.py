"""Per-rank memory: what a training or inference run holds, term by term, and what was measured.

``estimate.py`` (training), ``inference.py`` (caches and prefill), ``planner.py`` (does it fit, the
largest length or batch that fits, layouts ranked by a cost model) and ``measure.py`` (peak tensor
bytes of real runs, the oracle the estimates are tested against). ADR 0017 gives the model.
"""
