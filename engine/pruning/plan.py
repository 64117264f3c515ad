"""A pruning plan is data: a versioned JSON file that says, per layer, what the engine keeps.

    {"version": 1, "name": "balanced", "model": {...shape fingerprint...},
     "layers": [{"keep": true, "kept_q_heads": [0, 2, ...], "kept_kv_heads": [0, 1],
                 "kept_ffn_channels": [...], "attn_bias": [...], "ffn_bias": [...], "exit": null}, ...],
     "length": {"prefill_keep": [], "decode_sinks": 0, "decode_recent": 0, "decode_heavy": 0},
     "weights": "width-0.20.safetensors"}

`null` lists mean "keep all". `weights` (optional) names a safetensors file, relative to the plan
file, whose tensors (HF names, already sliced shapes) replace the pruned model's after slicing:
the least-squares refit of o_proj / down_proj (engine.pruning.reconstruct) or what healing
(engine.pruning.heal) trained. Plans are produced by `trident calibrate` and loaded by
`trident serve`; `PruningPlan.validate` checks one against the model before any weight is touched.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.config import ModelConfig

PLAN_VERSION = 1


class PlanError(ValueError):
    """A plan that does not fit the model or is malformed."""


@dataclass
class ExitPoint:
    """An early-exit classifier at the end of a layer (used by the depth axis)."""

    threshold: float
    probe_weight: list[float] | None = None   # [hidden] linear probe on the normalized state
    probe_bias: float = 0.0


@dataclass
class LayerPlan:
    keep: bool = True                              # False: the whole layer is skipped
    kept_q_heads: list[int] | None = None          # query heads kept (None = all)
    kept_kv_heads: list[int] | None = None         # KV heads kept (None = those the kept q heads use)
    kept_ffn_channels: list[int] | None = None     # FFN channels kept (None = all)
    attn_bias: list[float] | None = None           # [hidden] added to o_proj output: compensation for dropped heads
    ffn_bias: list[float] | None = None            # [hidden] added to down_proj output: compensation for dropped channels
    exit: ExitPoint | None = None


@dataclass
class LengthPolicy:
    prefill_keep: list[tuple[int, float]] = field(default_factory=list)  # (after layer m, fraction of tokens kept)
    decode_sinks: int = 0                          # decode KV budget: first tokens always kept
    decode_recent: int = 0                         # ... most recent tokens kept
    decode_heavy: int = 0                          # ... heavy hitters kept; all three 0 = no eviction


@dataclass
class PruningPlan:
    name: str
    model: dict                                    # ModelConfig shape fingerprint the plan was made for
    layers: list[LayerPlan]
    length: LengthPolicy = field(default_factory=LengthPolicy)
    weights: str | None = None                     # trained tensors for the pruned layers (see above)
    version: int = PLAN_VERSION
    base_dir: Path | None = field(default=None, compare=False)   # folder `weights` is relative to; not saved

    # ------------------------------------------------------------------ construction

    @staticmethod
    def fingerprint(config: ModelConfig) -> dict:
        return {k: getattr(config, k) for k in ("num_layers", "num_heads", "num_kv_heads", "head_dim",
                                                 "hidden_size", "intermediate_size", "vocab_size")}

    @classmethod
    def dense(cls, config: ModelConfig) -> "PruningPlan":
        return cls("dense", cls.fingerprint(config), [LayerPlan() for _ in range(config.num_layers)])

    @property
    def is_dense(self) -> bool:
        return all(l == LayerPlan() for l in self.layers) and self.length == LengthPolicy() and self.weights is None

    # ------------------------------------------------------------------ JSON

    def to_json(self) -> str:
        data = asdict(self)
        del data["base_dir"]
        return json.dumps(data, indent=1)

    @property
    def weights_path(self) -> Path | None:
        return None if self.weights is None else Path(self.base_dir or ".") / self.weights

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def from_dict(cls, data: dict) -> "PruningPlan":
        if not isinstance(data, dict):
            raise PlanError("a plan must be a JSON object")
        if data.get("version") != PLAN_VERSION:
            raise PlanError(f"plan version {data.get('version')!r} is not supported (expected {PLAN_VERSION})")
        try:
            layers = []
            for i, raw in enumerate(data["layers"]):
                raw = dict(raw)
                if raw.get("exit") is not None:
                    raw["exit"] = ExitPoint(**raw["exit"])
                layers.append(LayerPlan(**raw))
            length = LengthPolicy(**{**data.get("length", {}),
                                     "prefill_keep": [tuple(x) for x in data.get("length", {}).get("prefill_keep", [])]})
            weights = data.get("weights")
            if weights is not None and not isinstance(weights, str):
                raise PlanError(f"plan field 'weights' must be a file name, got {weights!r}")
            return cls(name=data["name"], model=data["model"], layers=layers, length=length, weights=weights)
        except (KeyError, TypeError) as e:
            raise PlanError(f"malformed plan: {e}") from e

    @classmethod
    def load(cls, path: Path) -> "PruningPlan":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"{path} is not valid JSON: {e}") from e
        plan = cls.from_dict(data)
        plan.base_dir = Path(path).parent
        return plan

    # ------------------------------------------------------------------ validation

    def validate(self, config: ModelConfig) -> None:
        """Raise PlanError naming the first thing that does not fit `config`."""
        expected = self.fingerprint(config)
        for key, value in expected.items():
            if self.model.get(key) != value:
                raise PlanError(f"plan {self.name!r} was made for {key}={self.model.get(key)}, model has {value}")
        if len(self.layers) != config.num_layers:
            raise PlanError(f"plan has {len(self.layers)} layers, model has {config.num_layers}")
        group = config.num_heads // config.num_kv_heads
        for i, layer in enumerate(self.layers):
            where = f"layer {i}"
            _check_indices(layer.kept_q_heads, config.num_heads, f"{where}: query head")
            _check_indices(layer.kept_kv_heads, config.num_kv_heads, f"{where}: KV head")
            _check_indices(layer.kept_ffn_channels, config.intermediate_size, f"{where}: FFN channel")
            if layer.kept_q_heads is not None and layer.kept_kv_heads is not None:
                for h in layer.kept_q_heads:
                    if h // group not in layer.kept_kv_heads:
                        raise PlanError(f"{where}: query head {h} is kept but its KV head {h // group} is dropped")
            for name in ("attn_bias", "ffn_bias"):
                bias = getattr(layer, name)
                if bias is not None and len(bias) != config.hidden_size:
                    raise PlanError(f"{where}: {name} has {len(bias)} values, hidden size is {config.hidden_size}")
            if layer.keep and layer.kept_q_heads == []:
                raise PlanError(f"{where}: keeps no query heads; drop the layer instead (keep: false)")
            if layer.exit is not None and layer.exit.probe_weight is not None \
                    and len(layer.exit.probe_weight) != config.hidden_size:
                raise PlanError(f"{where}: exit probe has {len(layer.exit.probe_weight)} weights, "
                                f"hidden size is {config.hidden_size}")
        for m, frac in self.length.prefill_keep:
            if not 0 <= m < config.num_layers or not 0 < frac <= 1:
                raise PlanError(f"prefill_keep entry ({m}, {frac}) needs a layer in [0, {config.num_layers}) "
                                f"and a fraction in (0, 1]")

    def kv_heads_of(self, i: int, config: ModelConfig) -> list[int]:
        """KV heads layer i keeps: the explicit list, or those its kept query heads use."""
        layer = self.layers[i]
        if layer.kept_kv_heads is not None:
            return sorted(layer.kept_kv_heads)
        if layer.kept_q_heads is None:
            return list(range(config.num_kv_heads))
        group = config.num_heads // config.num_kv_heads
        return sorted({h // group for h in layer.kept_q_heads})


def _check_indices(indices: list[int] | None, limit: int, what: str) -> None:
    if indices is None:
        return
    if len(set(indices)) != len(indices):
        raise PlanError(f"{what} list has duplicates")
    for i in indices:
        if not isinstance(i, int) or not 0 <= i < limit:
            raise PlanError(f"{what} {i} is out of range [0, {limit})")
