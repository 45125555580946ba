"""Per-rank memory: what a training or inference run holds, term by term, and what was measured.

``estimate.py`` (training, with ``activations.py`` per layer kind), ``inference.py`` (caches and
prefill), ``params.py`` (parameters per rank), ``planner.py`` (does it fit, the largest length or
batch that fits, layouts ranked by a cost model), ``report.py`` (the itemised result) and
``measure.py`` (peak tensor bytes of real runs, the oracle the estimates are tested against, with
``inference_grid.py``). ADR 0017 gives the model.
"""
