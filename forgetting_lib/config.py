"""Typed, frozen run configuration, loaded strictly from YAML or dicts.

A typo must never turn an experiment into a different one silently, so loading rejects unknown
keys and names the nearest valid one (`opt.lrr` -> "did you mean opt.lr?"). Field names carry
their units (`warmup_tokens`, `train_time_s`). `validate` checks combinations before any work.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from . import methods as methods_lib
from .fileio import FileFormatError, read_yaml


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key and the fix."""


@dataclass(frozen=True)
class RunConfig:
    experiment: str = "default"  # folder under outputs/ that groups related runs
    name: str = "run"  # run id: the run folder is outputs/<experiment>/<name>
    seed: int = 0  # root of every random key (init, data order, sampling)


@dataclass(frozen=True)
class DataConfig:
    path: str = ""  # token file (.bin with a .json sidecar) to train on
    T: int = 128  # sequence length in tokens (row length; position 0 = dataset id)
    batch_size: int = 32  # rows per optimizer step
    valid_tokens: int = 100_000  # tokens held out for validation (rounded up to whole rows)
    split_seed: int = 0  # seed of the train/valid row split; independent of run.seed
    old_path: str = ""  # finetuning: old-distribution token file for real replay and the `prev`
    # evaluation ('' = the parent run's own training data; a Hugging Face parent has none)
    eval_batch_size: int = 0  # rows per evaluation batch (0 = auto: fastest for the platform)
    microbatch_rows: int = 0  # rows per gradient-accumulation slice (0 = auto; a speed knob only)


@dataclass(frozen=True)
class MixConfig:
    path: str = ""  # second token file mixed into every batch ('' = no mixing)
    fraction: float = 0.0  # fraction of each batch's rows drawn from `path`, in [0, 1)
    valid_tokens: int = 100_000  # validation tokens held out of the mix file (metric `mix_ntp`)


@dataclass(frozen=True)
class ModelConfig:
    D: int = 256  # model (residual) width
    L: int = 6  # number of transformer blocks
    H: int = 64  # head dimension (heads N = D // H)
    V: int = 4096  # vocabulary size (must cover the token file's tokenizer)
    # The architecture's variants (defaults = the paper's model; a Hugging Face import sets them):
    heads: int = 0  # attention heads N (0 = D // H)
    kv_heads: int = 0  # key/value heads K (0 = N); K < N is grouped-query attention (Llama 3)
    F: int = 0  # MLP hidden width (0 = 4 D)
    mlp: str = "gelu"  # gelu: down(gelu_tanh(up x)) | swiglu: down(silu(gate x) * up x) (Llama)
    norm_gain: bool = False  # RMSNorms carry a learned per-channel gain (Llama); the paper's have none
    qk_norm: bool = True  # RMSNorm of queries and keys per head before RoPE (the paper, Qwen3)
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2)
    tie_embed: bool = False  # logits use the input embedding matrix (Llama 3.2 1B, SmolLM2)
    norm_eps: float = 1e-6  # RMSNorm epsilon
    rope_theta: float = 10_000.0  # RoPE base
    rope_factor: float = 1.0  # Llama 3 RoPE scaling: low frequencies divided by this (1 = none),
    rope_low_freq: float = 1.0  # wavelengths above original_len / low_freq scaled fully, those
    rope_high_freq: float = 4.0  # below original_len / high_freq kept, a smooth blend between
    rope_original_len: int = 8192  # the context length the RoPE scaling was designed around
    window: int = 0  # sliding-window attention: a query sees this many positions (0 = all, causal)
    param_dtype: str = "float32"  # float32 | bfloat16: parameters and AdamW moments stored in it.
    # bfloat16 has no float32 master copy: an update below ~1/256 of a weight rounds away (at LR
    # 1e-5 most weights of a pretrained model would never move); for memory, keep float32 here and
    # set dtype: bfloat16 (activations), or use LoRA
    dtype: str = "auto"  # activation dtype: auto | float32 | bfloat16
    remat: bool = False  # recompute block activations in the backward pass (saves memory)
    load_path: str = ""  # parent to finetune from ('' = train from scratch): a run folder, or
    # hf:<folder or hub id> for a Hugging Face causal LM (engine/hf.py); the architecture (the
    # keys above, from D) and the `parent` section are then read from it


@dataclass(frozen=True)
class MeshConfig:
    # devices a run is split over (engine/sharding.py): data x fsdp x tensor must equal the device count
    # of all processes, or be 1 x 1 x 1 (one device, the default); -1 on one axis takes the rest
    data: int = 1  # data parallel: batch rows split, parameters replicated
    fsdp: int = 1  # fully sharded data parallel: batch rows and parameters/optimizer state split
    tensor: int = 1  # tensor parallel: attention heads, MLP width and vocabulary split


@dataclass(frozen=True)
class RegConfig:
    method: str = "none"  # a regulariser: none | ntp_pre | kl_pre | kl_dwn | replace | ewc | l2sp
    # (engine/regularisers.py)
    coeff: float = 0.0  # regulariser weight; for `replace`: fraction of batch rows replaced
    synth: bool = False  # replay rows sampled from the frozen parent (else its real train rows)
    replay_batch_size: int = 0  # replay rows per step for ntp_pre / kl_pre (0 = data.batch_size)
    buffer: int = 16  # self-generated: each refill samples buffer x replay rows, used once
    temperature: float = 1.0  # self-generated: sampling temperature (1 = the model's distribution)
    top_p: float = 1.0  # self-generated: nucleus mass sampled from (1 = the full softmax, the paper)
    reuse: int = 1  # self-generated: steps each sampled row is replayed in (1 = once, the paper)
    prompt: str = "id"  # self-generated: each row's prompt: id (the old data's dataset-id token, BOS
    # for a Hugging Face model, alone: the paper) | chat (the parent's chat template for an empty
    # conversation, up to the assistant's turn)
    fisher_batches: int = 8  # ewc: replay batches used to estimate the diagonal Fisher


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 0  # LoRA rank on every non-embedding matrix (0 = full finetuning)


@dataclass(frozen=True)
class ParentConfig:
    """Filled in from `model.load_path` when a finetuning run starts; not meant to be set by hand."""

    data_path: str = ""  # the parent's training token file (its valid rows = `prev` set)
    split_seed: int = 0  # the parent's split seed, so `prev` rows are its validation rows
    T: int = 0  # the parent's row length
    valid_tokens: int = 0  # the parent's validation size
    seed: int = 0  # the parent's init seed for weight drift (-1: an imported model, init unknown)
    final_valid_ntp: float | None = None  # the parent's final validation loss (forgetting baseline)
    dataset_token: int = -1  # the id token of the parent's data (the self-generated prompt)
    tokenizer_fingerprint: str = ""  # the parent's tokenizer: every token file of the run must match


@dataclass(frozen=True)
class OptConfig:
    lr: float = 1e-3  # peak learning rate
    schedule: str = "constant"  # constant | cosine (cosine needs a fixed training length)
    warmup_tokens: int = 10_000_000  # linear warm-up length in training tokens
    b1: float = 0.9  # AdamW first-moment decay
    b2: float = 0.999  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.02  # decoupled weight decay, applied to every matrix


@dataclass(frozen=True)
class StopConfig:
    num_tokens_train: int | None = None  # stop after this many training tokens
    tokens_per_param: float | None = None  # stop after this many tokens per parameter (TPP)
    num_epochs: float | None = None  # stop after this many passes over the train rows
    target_loss: float | None = None  # stop when valid_ntp <= this (nats/token)
    train_time_s: float | None = None  # stop after this much pure train-step time (seconds)
    patience: int | None = None  # stop after this many evals without a new best valid_ntp


@dataclass(frozen=True)
class LogConfig:
    every_tokens: int = 100_000  # evaluate every this many training tokens
    checkpoint_every_tokens: int | None = None  # also checkpoint this often (None: only at the end)
    progress: bool = True  # show a progress bar / periodic progress lines
    eval_kl: bool = True  # finetuning: also evaluate KL to the parent (metrics *_kl)
    teacher_cache_mb: float = 4096  # memory for the parent's side of that KL, computed once per run:
    # per eval set its next-token probabilities (4 V bytes/token) if they fit, else its hidden
    # states (4 D bytes/token), else none (a parent forward at every evaluation, ~2x eval cost)
    mc_evals: str = ""  # multiple-choice benchmarks scored at every evaluation (metrics mc_<name>,
    # mc_mean): comma-separated name=spec, names mmlu | arc | csqa, specs hf:<dataset>[:<config>]
    # [?split=..&data_files=..] (prep/benchmarks.py; BENCHMARKS is the paper's); "" = none
    mc_limit: int = 0  # questions per benchmark, spread over its split (0 = all)
    # Optional mirrors of metrics.jsonl (trackers.py; pip install 'forgetting_lib[trackers]'):
    wandb: bool = False  # also log every metrics row to Weights & Biases (files in <run>/wandb/)
    wandb_project: str = "forgetting"  # the W&B project the run is logged to
    wandb_mode: str = "auto"  # auto | online | offline (auto: online only where WANDB_MODE says so
    # or W&B credentials are set up, else offline: upload with `wandb sync <run>/wandb/offline-run-*`)
    tensorboard: bool = False  # also write TensorBoard event files to <run>/tensorboard/


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    opt: OptConfig = field(default_factory=OptConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    log: LogConfig = field(default_factory=LogConfig)
    reg: RegConfig = field(default_factory=RegConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    parent: ParentConfig = field(default_factory=ParentConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, overrides: Mapping[str, Any]) -> "Config":
        """A validated copy with dotted keys changed: `cfg.replace({"model.D": 128})`."""
        new = from_dict(self.to_dict(), list(overrides.items()))
        object.__setattr__(new, "_given", given_keys(self) | set(overrides))
        return new


LENGTH_RULES = ("num_tokens_train", "tokens_per_param", "num_epochs")
ARCHITECTURE = (  # model keys a finetune takes from its parent
    *("D", "L", "H", "V", "heads", "kv_heads", "F", "mlp", "norm_gain", "qk_norm", "qkv_bias"),
    *("tie_embed", "norm_eps", "rope_theta", "rope_factor", "rope_low_freq", "rope_high_freq"),
    *("rope_original_len", "window"),
)

# Paths a config names. Given in a parameter file, an override or a notebook parameter, they are
# relative to the current directory (the project root, where `make`, the CLI examples and
# `setup_notebook()` work). Stored in a run folder's config.yaml, they are relative to that
# folder, with `written_at` (the folder's absolute path then) as the fallback for a folder moved
# away from what it names; see runs.py.
# Keys that change how a run is watched or where it runs, not what it computes (a mesh changes
# only the order of float sums): a run may be resumed, and a finished sweep point reused, with
# other values.
NEUTRAL_KEYS = ("log.progress", "log.wandb", "log.wandb_project", "log.wandb_mode", "log.tensorboard")
NEUTRAL_SECTIONS = ("mesh.",)
PATH_KEYS = ("data.path", "data.old_path", "mix.path", "model.load_path", "parent.data_path")
WRITTEN_AT = "written_at"
HF_PREFIX = "hf:"  # model.load_path of a Hugging Face model (engine/hf.py)


def paths_relative_to(raw: Mapping[str, Any], folder: str | Path) -> dict[str, Any]:
    """A config mapping as a run folder stores it: PATH_KEYS relative to `folder`, plus
    `written_at`."""
    base = os.path.abspath(folder)
    out = _map_paths(raw, lambda p: os.path.relpath(os.path.abspath(p), base))
    out[WRITTEN_AT] = base
    return out


def paths_resolved_from(raw: Mapping[str, Any], folder: str | Path) -> dict[str, Any]:
    """The inverse of `paths_relative_to` (paths relative to the current directory where `folder`
    is): each path from `folder`, or from `written_at` where only that one exists. A mapping
    without `written_at` (stored before paths were relative) is returned unchanged."""
    raw = dict(raw)
    written_at = raw.pop(WRITTEN_AT, None)
    if written_at is None:
        return raw

    def resolve(rel: str) -> str:
        here = os.path.normpath(os.path.join(folder, rel))
        there = os.path.normpath(os.path.join(written_at, rel))
        return here if os.path.exists(here) or not os.path.exists(there) else there

    return _map_paths(raw, resolve)


def _map_paths(raw: Mapping[str, Any], fn: Any) -> dict[str, Any]:
    """A copy of `raw` with `fn` applied to each non-empty string at a PATH_KEYS key."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    for key in PATH_KEYS:
        section, _, name = key.partition(".")
        value = out[section].get(name) if isinstance(out.get(section), dict) else None
        if isinstance(value, str) and value.startswith(HF_PREFIX):  # hf:<folder or hub id>
            rest = value[len(HF_PREFIX) :]
            mapped = fn(rest)
            if os.path.isdir(rest) or os.path.isdir(mapped):  # a local folder; a hub id stays as given
                out[section][name] = HF_PREFIX + mapped
        elif isinstance(value, str) and value:
            out[section][name] = fn(value)
    return out


def load(
    source: str | Path | Mapping[str, Any] | None = None, overrides: Sequence[str | tuple[str, Any]] = ()
) -> Config:
    """Config from a YAML file or mapping, with dotted overrides (`"model.D=128"`), validated."""
    if source is None:
        raw: Mapping[str, Any] = {}
    elif isinstance(source, Mapping):
        raw = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = read_yaml(path) or {}
        except FileFormatError as err:
            raise ConfigError(str(err)) from None
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
        raw = paths_resolved_from(raw, path.parent)  # a run folder's config.yaml: paths from there
    return from_dict(raw, overrides)


def from_dict(raw: Mapping[str, Any], overrides: Sequence[str | tuple[str, Any]] = ()) -> Config:
    """A validated Config from nested sections plus dotted overrides, applied in order. The
    pseudo-key `method` (top level, or an override `method=kl_self`) stands for the named
    method's overrides (`methods.METHODS`), applied at its place: before the overrides for a
    top-level key, so later keys refine it."""
    merged = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    pairs = [parse_override(item) for item in overrides]
    if "method" in merged:
        pairs.insert(0, ("method", merged.pop("method")))
    try:
        pairs = methods_lib.expand(pairs)
    except KeyError as err:
        raise ConfigError(f"method: {err.args[0]}") from None
    for key, value in pairs:
        section, _, name = key.partition(".")
        if not name:
            raise ConfigError(f"override {key!r} must be section.key=value, e.g. model.D=128")
        target = merged.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"override {key!r}: config section {section} is not a mapping")
        target[name] = value
    cfg = _build(Config, merged, "")
    validate(cfg)
    given = {f"{sec}.{k}" for sec, body in merged.items() if isinstance(body, Mapping) for k in body}
    object.__setattr__(cfg, "_given", frozenset(given))
    return cfg


def given_keys(cfg: Config) -> frozenset[str]:
    """The dotted keys the config's source and overrides set (not left at their defaults). A
    Config built directly from the dataclasses counts the keys whose value is not the default."""
    given = getattr(cfg, "_given", None)
    if given is not None:
        return given
    mine, defaults = flatten(cfg.to_dict()), flatten(Config().to_dict())
    return frozenset(k for k, v in mine.items() if defaults.get(k) != v)


def flatten(value: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as one mapping of dotted keys: {"opt": {"lr": 1}} -> {"opt.lr": 1}."""
    out: dict[str, Any] = {}
    for k, v in value.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, Mapping) else {key: v})
    return out


def parse_override(item: str | tuple[str, Any]) -> tuple[str, Any]:
    """("key", value) from "key=value" (the value read as YAML) or from a (key, value) pair."""
    if isinstance(item, tuple):
        return item
    key, sep, text = item.partition("=")
    if not sep:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    try:
        return key.strip(), yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(
            f"override {item!r}: the value is not valid YAML ({problem}); quote it, e.g. {key}='...'"
        ) from None


def build_dataclass(cls: type, raw: Any, prefix: str = "") -> Any:
    """A frozen dataclass `cls` from a mapping, strictly: unknown keys (with the nearest valid key
    suggested) and wrongly typed values are ConfigErrors naming `prefix` + key."""
    return _build(cls, raw, prefix)


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check/convert a scalar against its annotation (YAML reads `1e-3` as a string)."""
    args = typing.get_args(hint)
    optional = type(None) in args and (typing.get_origin(hint) in (typing.Union, types.UnionType))
    if optional:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if hint is int:
            if isinstance(value, bool):
                raise TypeError
            as_float = float(value)
            if not as_float.is_integer():
                raise TypeError
            return int(as_float)
        if hint is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if hint is str:
            if not isinstance(value, str):
                raise TypeError
            return value
    except (TypeError, ValueError):
        pass
    else:
        raise ConfigError(f"{key}: unsupported annotation {hint}")
    raise ConfigError(f"{key} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def validate(cfg: Config) -> None:
    """Reject inconsistent combinations before any work starts."""
    m, d, o, s = cfg.model, cfg.data, cfg.opt, cfg.stop
    _check(
        m.D > 0 and m.L > 0 and m.H > 0 and m.heads >= 0 and (m.heads > 0 or m.D % m.H == 0),
        "model.D",
        f"model.D={m.D} must be a positive multiple of model.H={m.H} (or set model.heads)",
    )
    _check(m.V > 0, "model.V", f"model.V={m.V} must be positive")
    heads, kv_heads = m.heads or m.D // m.H, m.kv_heads or m.heads or m.D // m.H
    _check(
        heads > 0 and kv_heads > 0 and heads % kv_heads == 0,
        "model.kv_heads",
        f"model.kv_heads={kv_heads} must divide the {heads} attention heads (model.heads)",
    )
    _check(m.F >= 0, "model.F", f"model.F={m.F} must be >= 0 (0 = 4 D)")
    _check(m.window >= 0, "model.window", f"model.window={m.window} must be >= 0 (0 = no window)")
    _check(
        m.norm_eps > 0 and m.rope_theta > 0 and m.rope_factor > 0,
        "model.rope_theta",
        "model.norm_eps, model.rope_theta and model.rope_factor must be > 0",
    )
    _check(
        m.rope_factor == 1 or (m.rope_high_freq > m.rope_low_freq > 0 and m.rope_original_len > 0),
        "model.rope_high_freq",
        "Llama 3 RoPE scaling needs model.rope_high_freq > model.rope_low_freq > 0 and rope_original_len > 0",
    )
    _check(m.mlp in ("gelu", "swiglu"), "model.mlp", f"model.mlp={m.mlp!r} must be gelu or swiglu")
    _check(
        m.param_dtype in ("float32", "bfloat16"),
        "model.param_dtype",
        f"model.param_dtype={m.param_dtype!r} must be float32 or bfloat16",
    )
    _check(
        m.dtype in ("auto", "float32", "bfloat16"),
        "model.dtype",
        f"model.dtype={m.dtype!r} must be auto, float32 or bfloat16",
    )
    _check(
        d.T >= 2 and d.batch_size >= 1 and d.eval_batch_size >= 0,
        "data.T",
        "data.T must be >= 2, data.batch_size >= 1 and data.eval_batch_size >= 0",
    )
    _check(
        d.microbatch_rows >= 0 and (d.microbatch_rows == 0 or d.batch_size % d.microbatch_rows == 0),
        "data.microbatch_rows",
        f"data.microbatch_rows={d.microbatch_rows} must divide "
        f"data.batch_size={d.batch_size} (or be 0 for automatic)",
    )
    _check(d.valid_tokens >= 0, "data.valid_tokens", "data.valid_tokens must be >= 0")
    mesh = cfg.mesh
    sizes = (mesh.data, mesh.fsdp, mesh.tensor)
    _check(
        all(n >= 1 or n == -1 for n in sizes) and sizes.count(-1) <= 1,
        "mesh.data",
        f"mesh.data={mesh.data}, mesh.fsdp={mesh.fsdp}, mesh.tensor={mesh.tensor}: each must be a "
        f"positive device count, or -1 on one of them for all the devices left",
    )
    _check(0 <= cfg.mix.fraction < 1, "mix.fraction", f"mix.fraction={cfg.mix.fraction} must be in [0, 1)")
    _check(
        not (cfg.mix.fraction > 0 and not cfg.mix.path),
        "mix.path",
        "mix.fraction > 0 needs mix.path (the token file to mix in)",
    )
    _check(
        o.schedule in ("constant", "cosine"),
        "opt.schedule",
        f"opt.schedule={o.schedule!r} must be constant or cosine",
    )
    _check(o.lr > 0 and o.warmup_tokens >= 0, "opt.lr", "opt.lr must be > 0 and opt.warmup_tokens >= 0")
    lengths = [r for r in LENGTH_RULES if getattr(s, r) is not None]
    _check(len(lengths) <= 1, "stop", f"set at most one training-length rule, got {', '.join(lengths)}")
    _check(
        not (o.schedule == "cosine" and not lengths),
        "opt.schedule",
        "a cosine schedule needs a fixed length: set stop.num_tokens_train, stop.tokens_per_param "
        "or stop.num_epochs",
    )
    any_stop = lengths or s.target_loss is not None or s.train_time_s is not None or s.patience
    _check(
        bool(any_stop), "stop", "no stop rule set: the run would never end; set e.g. stop.num_tokens_train"
    )
    for name in ("num_tokens_train", "tokens_per_param", "num_epochs", "train_time_s", "patience"):
        value = getattr(s, name)
        _check(
            value is None or (value > 0 and math.isfinite(value)),
            f"stop.{name}",
            f"stop.{name}={value} must be positive",
        )
    _check(cfg.log.every_tokens > 0, "log.every_tokens", "log.every_tokens must be positive")
    _check(cfg.log.teacher_cache_mb >= 0, "log.teacher_cache_mb", "log.teacher_cache_mb must be >= 0")
    _validate_benchmarks(cfg.log)
    _check(
        cfg.log.wandb_mode in ("auto", "online", "offline"),
        "log.wandb_mode",
        f"log.wandb_mode={cfg.log.wandb_mode!r} must be auto, online or offline",
    )
    _check(
        bool(cfg.log.wandb_project) and not set(cfg.log.wandb_project) & set("/\\#?%:"),
        "log.wandb_project",
        f"log.wandb_project={cfg.log.wandb_project!r} must be a non-empty W&B project name "
        f"without / \\ # ? % :",
    )
    _validate_finetuning(cfg)


def _validate_benchmarks(log: LogConfig) -> None:
    from .prep.benchmarks import BenchmarkError, parse_benchmarks

    try:
        parse_benchmarks(log.mc_evals)
    except BenchmarkError as err:
        raise ConfigError(f"log.mc_evals: {err}") from None
    _check(log.mc_limit >= 0, "log.mc_limit", f"log.mc_limit={log.mc_limit} must be >= 0 (0 = all questions)")


def _validate_finetuning(cfg: Config) -> None:
    from .engine.regularisers import REGULARISERS

    r = cfg.reg
    _check(
        r.method in REGULARISERS,
        "reg.method",
        f"reg.method={r.method!r} must be one of {', '.join(REGULARISERS)}",
    )
    _check(
        not cfg.data.old_path or bool(cfg.model.load_path),
        "data.old_path",
        "data.old_path names the old data of a finetune's parent: set model.load_path, or remove it",
    )
    _check(
        r.prompt == "id" or r.synth,
        "reg.prompt",
        "reg.prompt=chat prompts self-generated rows: it needs reg.synth=true",
    )
    _check(
        not REGULARISERS[r.method].needs_parent or bool(cfg.model.load_path),
        "reg.method",
        f"reg.method={r.method} regularises towards the parent, but there is no parent: "
        f"set model.load_path to a finished pretraining run",
    )
    _check(
        cfg.lora.rank == 0 or bool(cfg.model.load_path),
        "lora.rank",
        "LoRA finetunes a pretrained model: set model.load_path",
    )
    _check(r.coeff >= 0, "reg.coeff", f"reg.coeff={r.coeff} must be >= 0")
    _check(
        not REGULARISERS[r.method].coeff_is_fraction or r.coeff < 1,
        "reg.coeff",
        f"reg.coeff={r.coeff}: for reg.method={r.method} it is the replaced fraction, in [0, 1)",
    )
    _check(
        r.replay_batch_size >= 0 and r.buffer >= 1 and r.temperature >= 0 and r.fisher_batches >= 1,
        "reg",
        "reg.replay_batch_size >= 0, reg.buffer >= 1, reg.temperature >= 0, reg.fisher_batches >= 1",
    )
    _check(0 < r.top_p <= 1, "reg.top_p", f"reg.top_p={r.top_p} must be in (0, 1] (1 = full softmax)")
    _check(r.reuse >= 1, "reg.reuse", f"reg.reuse={r.reuse} must be >= 1 (1 = each row replayed once)")
    _check(r.prompt in ("id", "chat"), "reg.prompt", f"reg.prompt={r.prompt!r} must be id or chat")
    _check(cfg.lora.rank >= 0, "lora.rank", "lora.rank must be >= 0")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def dump(cfg: Config | Mapping[str, Any], path: str | Path) -> None:
    """Write a config (or a resolved dict) as YAML, atomically."""
    data = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    from .fileio import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(data, sort_keys=False))
