"""Offline pruning: from text and the dense model to plan files (`trident calibrate`, `trident plan`).

statistics  moments and scores collected in one pass of the dense model
width       which heads and channels to drop; reconstruct: the least-squares refit that compensates
depth       which layers to drop, and the refit that carries what a dropped run added
exits       early-exit probes and their thresholds
heal        short distillation of a pruned model toward the dense one
evaluate    held-out perplexity and teacher-forced continuations
calibrate   the single-axis sweeps and profiles
The runtime side (plan format, applying a plan, per-step decisions, FLOP accounting) is
engine.pruning.
"""
