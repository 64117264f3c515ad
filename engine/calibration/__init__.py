"""Offline pruning: from text and the dense model to plan files (`trident calibrate`, `trident plan`).

statistics  moments and scores collected in one pass of the dense model
width       which heads and channels to drop; reconstruct: the least-squares refit that compensates
depth       which layers to drop, and the refit that carries what a dropped run added
exits       early-exit probes and their thresholds
heal        short distillation of a pruned model toward the dense one
passes      hooked prefill passes that collect statistics
evaluate    held-out perplexity and teacher-forced continuations
timing      engines timed side by side, one step each in turn
calibrate   the single-axis sweeps and profiles (`trident calibrate`)
compose     one plan from a setting on every axis
cost_model  step time predicted from a plan's shape, fitted to timed steps
search      the greedy numerical-gradient path and the Pareto set
candidates  a planning run's measurements: statistics, candidate plans, quality, timing, KV memory
planner     `trident plan`: cost model, search, target, profiles, timing check
The runtime side (plan format, applying a plan, per-step decisions, FLOP accounting) is
engine.pruning.
"""
