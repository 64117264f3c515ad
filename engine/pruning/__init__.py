"""Runtime pruning: plans (data), applying a plan to weights, the length axis's per-step
decisions, profiles by name, and per-axis FLOP accounting. Producing plans is
engine.calibration's."""
