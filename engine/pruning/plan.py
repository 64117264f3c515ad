"""A pruning plan is data: a versioned JSON file that says, per layer, what the engine keeps.

    {"version": 1, "name": "balanced", "model": {...shape fingerprint...},
     "layers": [{"keep": true, "kept_q_heads": [0, 2, ...], "kept_kv_heads": [0, 1],
                 "kept_ffn_channels": [...], "attn_bias": [...], "ffn_bias": [...], "exit": null}, ...],
     "length": {"prefill_keep": [], "decode_sinks": 0, "decode_recent": 0, "decode_heavy": 0},
     "weights": "width-0.20.safetensors"}

`null` lists mean "keep all" (a null `kept_kv_heads`: the KV heads the kept query heads read).
`weights` (optional) names a safetensors file, relative to the plan file, whose tensors (HF
names, already sliced shapes) replace the pruned model's after slicing: the least-squares refit
of o_proj / down_proj (engine.calibration.reconstruct) or what healing (engine.calibration.heal) trained.
`model` holds the shape the plan was made for and, from `trident calibrate`, a digest of the
checkpoint's tensors. Plans are produced by `trident calibrate` (one axis) and `trident plan`
(every axis) and loaded by `trident serve`; `PruningPlan.validate` checks one against the model
before any weight is touched.
"""
from __future__ import annotations

import hashlib
import json
import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from trident.engine.config import ModelConfig

PLAN_VERSION = 1
# What width pruning drops from attention: single query heads, or whole KV groups (a KV head with
# the query heads that read it). Either way a plan lists the heads kept; calibration picks them.
HEAD_UNITS = ("head", "group")


class PlanError(ValueError):
    """A plan that does not fit the model or is malformed."""


@dataclass
class ExitPoint:
    """An early-exit classifier at the end of a layer (used by the depth axis)."""

    threshold: float
    probe_weight: list[float] | None = None   # [hidden] linear probe on the normalized state
    probe_bias: float = 0.0
    temperature: float = 1.0                   # an exited token's logits are divided by this


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
    """The length axis (engine/pruning/length.py runs it). Prefill: after layer m, only a fraction
    of each prefill chunk's tokens go on to deeper layers. Decode: a KV budget per sequence."""

    prefill_keep: list[tuple[int, float]] = field(default_factory=list)  # (after layer m, fraction of tokens kept)
    decode_sinks: int = 0                          # decode KV budget: first tokens always kept
    decode_recent: int = 0                         # ... most recent tokens kept
    decode_heavy: int = 0                          # ... heavy hitters kept; all three 0 = no eviction
    window: int = 32                               # last queries of a chunk whose attention mass scores keys
    prefill_sinks: int = 4                         # first prompt tokens prefill dropping always keeps
    prefill_pool: int = 31                         # odd; rows scored by the max mass among this many neighbours
    prefill_recent: int = 0                        # last known tokens (the prompt's, or prompt + output in a recompute) prefill dropping always keeps
    kv_pool: int = 1                               # odd; heavy hitters scored the same way among neighbouring keys
    evict_during_prefill: bool = False             # a budget also evicts between prompt chunks (else once, at its end)

    @property
    def kv_budget(self) -> int:
        """Keys a sequence keeps after each step; 0 = no eviction."""
        return self.decode_sinks + self.decode_recent + self.decode_heavy

    @property
    def is_active(self) -> bool:
        return bool(self.prefill_keep) or self.kv_budget > 0


@dataclass
class PruningPlan:
    name: str
    model: dict                                    # ModelConfig shape fingerprint (+ "digest") the plan was made for
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

    @staticmethod
    def checkpoint_digest(state: dict[str, torch.Tensor]) -> str:
        """A short hash of a few dense tensors (HF names): tells apart checkpoints of one shape, whose
        refit or healed weights and biases do not carry over. `trident calibrate` records it in
        `model["digest"]`; plans without one are checked by shape only."""
        h = hashlib.sha256()
        for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.weight"):
            if name in state:
                h.update(state[name].detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

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
        """A plan from parsed JSON; PlanError names the first field of the wrong kind."""
        if not isinstance(data, dict):
            raise PlanError("a plan must be a JSON object")
        version = data.get("version")
        if type(version) is not int or version != PLAN_VERSION:
            raise PlanError(f"plan version {version!r} is not supported (expected {PLAN_VERSION})")
        for key in ("name", "model", "layers"):
            if key not in data:
                raise PlanError(f"malformed plan: no {key!r} field")
        unknown = sorted(set(data) - {"version", "name", "model", "layers", "length", "weights"})
        if unknown:
            raise PlanError(f"malformed plan: unknown field {unknown[0]!r}")
        if not isinstance(data["name"], str):
            raise PlanError(f"plan field 'name' must be a string, got {data['name']!r}")
        if not isinstance(data["model"], dict):
            raise PlanError(f"plan field 'model' must be an object (the model's shape), got {data['model']!r}")
        if not isinstance(data["layers"], list):
            raise PlanError("plan field 'layers' must be a list with one object per layer")
        weights = data.get("weights")
        if weights is not None and not isinstance(weights, str):
            raise PlanError(f"plan field 'weights' must be a file name, got {weights!r}")
        layers = [_layer_from_json(raw, f"layer {i}") for i, raw in enumerate(data["layers"])]
        return cls(name=data["name"], model=data["model"], layers=layers,
                   length=_length_from_json(data.get("length", {})), weights=weights)

    @classmethod
    def load(cls, path: Path) -> "PruningPlan":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"{path} is not valid JSON: {e}") from e
        except (OSError, UnicodeDecodeError) as e:
            raise PlanError(f"cannot read plan {path}: {e}") from e
        plan = cls.from_dict(data)
        plan.base_dir = Path(path).parent
        return plan

    # ------------------------------------------------------------------ validation

    def validate(self, config: ModelConfig, digest: str | None = None) -> None:
        """Raise PlanError naming the first thing that does not fit `config` (and, when both the
        plan and the caller give one, the checkpoint `digest`)."""
        expected = self.fingerprint(config)
        for key, value in expected.items():
            if self.model.get(key) != value:
                raise PlanError(f"plan {self.name!r} was made for {key}={self.model.get(key)}, model has {value}")
        if digest is not None and self.model.get("digest") not in (None, digest):
            raise PlanError(f"plan {self.name!r} was calibrated on another checkpoint of this shape (digest "
                            f"{self.model['digest']}, model {digest}); run `trident calibrate` for this model")
        if len(self.layers) != config.num_layers:
            raise PlanError(f"plan has {len(self.layers)} layers, model has {config.num_layers}")
        if not any(layer.keep for layer in self.layers):
            raise PlanError(f"plan {self.name!r} drops every layer")
        group = config.num_heads // config.num_kv_heads
        for i, layer in enumerate(self.layers):
            where = f"layer {i}"
            if not layer.keep:
                # A dropped layer has no weights for width lists, biases or an exit to act on.
                for name in ("kept_q_heads", "kept_kv_heads", "kept_ffn_channels", "attn_bias", "ffn_bias", "exit"):
                    if getattr(layer, name) is not None:
                        raise PlanError(f"{where} is dropped (keep: false) but sets {name!r}, which would be ignored")
            _check_indices(layer.kept_q_heads, config.num_heads, f"{where}: query head")
            _check_indices(layer.kept_kv_heads, config.num_kv_heads, f"{where}: KV head")
            _check_indices(layer.kept_ffn_channels, config.intermediate_size, f"{where}: FFN channel")
            if layer.kept_kv_heads is not None:
                q_heads = range(config.num_heads) if layer.kept_q_heads is None else layer.kept_q_heads
                for h in q_heads:
                    if h // group not in layer.kept_kv_heads:
                        raise PlanError(f"{where}: query head {h} is kept but its KV head {h // group} is dropped")
            for name in ("attn_bias", "ffn_bias"):
                bias = getattr(layer, name)
                if bias is not None and len(bias) != config.hidden_size:
                    raise PlanError(f"{where}: {name} has {len(bias)} values, hidden size is {config.hidden_size}")
            if layer.keep and layer.kept_q_heads == []:
                raise PlanError(f"{where}: keeps no query heads; drop the layer instead (keep: false)")
            if layer.exit is not None:
                if layer.exit.probe_weight is None or len(layer.exit.probe_weight) != config.hidden_size:
                    raise PlanError(f"{where}: an exit needs a probe of {config.hidden_size} weights (the hidden "
                                    f"size), got {None if layer.exit.probe_weight is None else len(layer.exit.probe_weight)}")
                if not 0.0 <= layer.exit.threshold <= 1.0:
                    raise PlanError(f"{where}: exit threshold must be in [0, 1], got {layer.exit.threshold}")
                if not any(later.keep for later in self.layers[i + 1:]):
                    raise PlanError(f"{where}: an exit after the last kept layer skips nothing")
        try:
            check_length_policy(self.length, config.num_layers, [layer.keep for layer in self.layers])
        except ValueError as e:
            raise PlanError(f"plan {self.name!r}: {e}") from e

    def kv_heads_of(self, i: int, config: ModelConfig) -> list[int]:
        """KV heads layer i keeps: the explicit list, or those its kept query heads use."""
        layer = self.layers[i]
        if layer.kept_kv_heads is not None:
            return sorted(layer.kept_kv_heads)
        if layer.kept_q_heads is None:
            return list(range(config.num_kv_heads))
        group = config.num_heads // config.num_kv_heads
        return sorted({h // group for h in layer.kept_q_heads})


def check_length_policy(policy: LengthPolicy, num_layers: int, kept_layers: list[bool] | None = None) -> None:
    """ValueError naming the first part of a length policy that cannot run on this model."""
    last = -1
    for m, frac in policy.prefill_keep:
        if not 0 <= m < num_layers or not 0 < frac <= 1:
            raise ValueError(f"prefill_keep entry ({m}, {frac}) needs a layer in [0, {num_layers}) and a "
                             f"fraction in (0, 1]")
        if m <= last:
            raise ValueError(f"prefill_keep layers must increase, got {m} after {last}")
        if kept_layers is not None and not kept_layers[m]:
            raise ValueError(f"prefill_keep layer {m} is dropped by the plan; prune after a layer it keeps")
        last = m
    fractions = [frac for _, frac in policy.prefill_keep]
    if fractions != sorted(fractions, reverse=True):
        raise ValueError(f"prefill_keep fractions must not increase with depth, got {fractions}")
    if policy.kv_budget and policy.decode_recent < 1:
        raise ValueError("a KV budget needs decode_recent >= 1: the newest token is always kept")
    if policy.window < 1 or policy.prefill_sinks < 0:
        raise ValueError(f"window must be >= 1 and prefill_sinks >= 0, got {policy.window}, {policy.prefill_sinks}")
    for name in ("prefill_pool", "kv_pool"):
        if getattr(policy, name) < 1 or getattr(policy, name) % 2 == 0:
            raise ValueError(f"{name} must be an odd count >= 1, got {getattr(policy, name)}")


def _check_indices(indices: list[int] | None, limit: int, what: str) -> None:
    if indices is None:
        return
    if len(set(indices)) != len(indices):
        raise PlanError(f"{what} list has duplicates")
    for i in indices:
        if not _is_int(i) or not 0 <= i < limit:       # plans built in code skip from_dict's type checks
            raise PlanError(f"{what} {i!r} is out of range [0, {limit})")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)   # JSON true is no index


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _list_of(value, check, what: str, kind: str) -> list | None:
    """value when it is null or a list whose items all pass `check`; else PlanError."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise PlanError(f"{what} must be a list of {kind} or null, got {value!r}")
    for item in value:
        if not check(item):
            raise PlanError(f"{what} must hold {kind}, got {item!r}")
    return value


def _layer_from_json(raw, where: str) -> LayerPlan:
    if not isinstance(raw, dict):
        raise PlanError(f"{where}: must be an object, got {raw!r}")
    unknown = sorted(set(raw) - set(LayerPlan.__dataclass_fields__))
    if unknown:
        raise PlanError(f"{where}: unknown field {unknown[0]!r}")
    keep = raw.get("keep", True)
    if type(keep) is not bool:
        raise PlanError(f"{where}: 'keep' must be true or false, got {keep!r}")
    lists = {name: _list_of(raw.get(name), _is_int, f"{where}: {name!r}", "integer indices")
             for name in ("kept_q_heads", "kept_kv_heads", "kept_ffn_channels")}
    lists.update({name: _list_of(raw.get(name), _is_number, f"{where}: {name!r}", "numbers")
                  for name in ("attn_bias", "ffn_bias")})
    exit_point = raw.get("exit")
    if exit_point is not None:
        if not isinstance(exit_point, dict) or not _is_number(exit_point.get("threshold")):
            raise PlanError(f"{where}: 'exit' must be an object with a numeric 'threshold', got {exit_point!r}")
        try:
            exit_point = ExitPoint(**exit_point)
        except TypeError as e:
            raise PlanError(f"{where}: malformed 'exit': {e}") from e
        _list_of(exit_point.probe_weight, _is_number, f"{where}: exit 'probe_weight'", "numbers")
        if not _is_number(exit_point.temperature) or not exit_point.temperature > 0:
            raise PlanError(f"{where}: exit 'temperature' must be a positive number, got {exit_point.temperature!r}")
        if not _is_number(exit_point.probe_bias):
            raise PlanError(f"{where}: exit 'probe_bias' must be a number, got {exit_point.probe_bias!r}")
    return LayerPlan(keep=keep, exit=exit_point, **lists)


def _length_from_json(raw) -> LengthPolicy:
    if not isinstance(raw, dict):
        raise PlanError(f"plan field 'length' must be an object, got {raw!r}")
    unknown = sorted(set(raw) - set(LengthPolicy.__dataclass_fields__))
    if unknown:
        raise PlanError(f"length policy: unknown field {unknown[0]!r}")
    budget = {}
    for name in ("decode_sinks", "decode_recent", "decode_heavy", "window", "prefill_sinks", "prefill_pool", "prefill_recent",
                 "kv_pool"):
        value = raw.get(name, LengthPolicy.__dataclass_fields__[name].default)
        if not _is_int(value) or value < 0:
            raise PlanError(f"length policy: {name!r} must be a token count >= 0, got {value!r}")
        budget[name] = value
    schedule = raw.get("prefill_keep", [])
    if not isinstance(schedule, list) or not all(
            isinstance(x, list) and len(x) == 2 and _is_int(x[0]) and _is_number(x[1]) for x in schedule):
        raise PlanError(f"length policy: 'prefill_keep' must be a list of [layer, fraction] pairs, got {schedule!r}")
    streaming = raw.get("evict_during_prefill", False)
    if type(streaming) is not bool:
        raise PlanError(f"length policy: 'evict_during_prefill' must be true or false, got {streaming!r}")
    return LengthPolicy(prefill_keep=[tuple(x) for x in schedule], evict_during_prefill=streaming, **budget)
