"""Pruning plans (data), calibration (statistics -> plans), application (plan -> sliced weights),
and per-axis FLOP accounting."""
