"""Calibration passes: the engine prefills text windows while forward hooks on its model collect
statistics (engine.calibration.statistics for width and Block Influence, engine.calibration.depth
for runs of dropped layers)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch.utils.hooks import RemovableHandle
from tqdm import tqdm

from trident.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from trident.engine.llm import LLM


def prefill_windows(llm: "LLM", windows: list[list[int]], hooks: list[RemovableHandle], desc: str) -> None:
    """Prefill each token window (nothing sampled) with `hooks` attached, then remove them, also
    when a pass fails."""
    try:
        for window in tqdm(windows, desc=desc, unit="window"):
            llm.generate([window], SamplingParams(max_tokens=0))
    finally:
        for hook in hooks:
            hook.remove()
