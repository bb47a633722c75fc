"""The run's configuration: frozen dataclasses, bound from gin files and nothing else.

gin is only a binding layer (architecture.md): ``parse(gin_files, gin_params)`` reads the files
and overrides, and ``RunConfig.from_gin()`` resolves them once into plain objects that the
rest of the code takes as arguments. Bindable: ``ModelSpec`` (a preset by name, its twin and
field overrides), ``DataConfig``, ``SyntheticConfig`` (read when ``DataConfig.source = 'synthetic'``),
``OptimConfig``, ``MeshConfig``, ``TrainConfig``.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import gin

from kda_jax.data import DataConfig
from kda_jax.data.synthetic import SyntheticConfig
from kda_jax.models import ModelConfig, get_config, hybrid_layout, variant

# The checkout's configs/ (editable install); with a non-editable install, the working directory's.
CONFIG_DIR = next((d for d in (pathlib.Path(__file__).resolve().parents[1] / "configs", pathlib.Path.cwd() / "configs")
                   if d.is_dir()), pathlib.Path(__file__).resolve().parents[1] / "configs")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model preset (``kda_jax.models.get_config`` name), optionally its twin, with overrides.

    ``kda_per_mla`` rebuilds the layer pattern at another hybrid ratio (0 = all MLA) with
    ``kda_jax.models.hybrid_layout``; ``overrides`` sets any other ``ModelConfig`` field.
    """

    preset: str = "small"
    variant: str | None = None
    kda_per_mla: int | None = None
    overrides: Any = dataclasses.field(default_factory=dict)

    def build(self) -> ModelConfig:
        config = get_config(self.preset)
        overrides = dict(self.overrides)
        if self.kda_per_mla is not None:  # the pattern of the final depth (overrides may change it)
            kda, full = hybrid_layout(overrides.get("num_hidden_layers", config.num_hidden_layers), self.kda_per_mla)
            overrides.update(kda_layers=kda, full_attn_layers=full)
        if overrides:
            config = config.replace(**overrides)
        return variant(config, self.variant) if self.variant else config


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one of them may be -1 (fills the devices)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    expert: int = 1


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"                # "adamw" | "muon"
    learning_rate: float = 3e-3
    schedule: str = "cosine"           # "cosine" (warmup-cosine) | "wsd" (warmup-stable-decay) | "constant"
    warmup_steps: int = 100
    decay_fraction: float = 0.2        # WSD: the last fraction of the steps decays linearly to min_lr_ratio
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False     # weight decay on the input embedding (never on norms, A_log, dt_bias)
    clip_norm: float = 1.0             # global-norm clipping; 0 disables
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5
    muon_rms: float = 0.2              # "consistent RMS": updates scaled to AdamW's RMS (Moonlight)

    def __post_init__(self):
        if self.name not in ("adamw", "muon"):
            raise ValueError(f"OptimConfig.name must be 'adamw' or 'muon', got {self.name!r}")
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise ValueError(f"OptimConfig.schedule must be 'cosine', 'wsd' or 'constant', got {self.schedule!r}")
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"OptimConfig.decay_fraction must be in [0, 1], got {self.decay_fraction}")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    seed: int = 0
    microbatches: int = 1              # gradient accumulation: the batch is split into this many parts
    z_loss: float = 0.0                # coefficient of mean(logsumexp(logits)²)
    router_bias_rate: float = 1e-3     # aux-loss-free MoE balancing step (0 disables)
    max_bad_steps: int = 5             # halt after this many non-finite steps in a row
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    sample_tokens: int = 200           # length of the text sample at the end of a run (0: none)
    sample_prompt: str = "ROMEO:"
    sample_temperature: float = 0.8

    def __post_init__(self):
        for name in ("steps", "microbatches", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                     "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    mesh: MeshConfig
    train: TrainConfig
    operative: str = ""                # the gin text this run was configured with
    synthetic: SyntheticConfig | None = None   # the task when data.source == "synthetic"

    @classmethod
    def from_gin(cls) -> "RunConfig":
        data = _DataConfig()
        synthetic = _SyntheticConfig() if data.source == "synthetic" else None
        run = cls(model=ModelSpec().build(), data=data, optim=OptimConfig(), mesh=MeshConfig(),
                  train=TrainConfig(), synthetic=synthetic)
        if synthetic is not None and synthetic.model_vocab_size > run.model.vocab_size:
            raise ValueError(f"SyntheticConfig(task={synthetic.task!r}) needs a vocabulary of "
                             f"{synthetic.model_vocab_size} ids, the model has vocab_size={run.model.vocab_size}")
        return dataclasses.replace(run, operative=gin.operative_config_str())


_DataConfig = gin.external_configurable(DataConfig, name="DataConfig")
_SyntheticConfig = gin.external_configurable(SyntheticConfig, name="SyntheticConfig")


def parse(gin_files=(), gin_params=()) -> RunConfig:
    """Parse gin files and bindings (relative includes resolve against configs/) into a RunConfig."""
    gin.clear_config()
    for f in gin_files:
        if not pathlib.Path(f).is_file():
            raise FileNotFoundError(f"gin file {f} does not exist")
    gin.add_config_file_search_path(str(CONFIG_DIR))
    gin.add_config_file_search_path(str(CONFIG_DIR.parent))
    try:
        gin.parse_config_files_and_bindings(list(gin_files), list(gin_params))
        return RunConfig.from_gin()
    except (ValueError, KeyError) as e:
        raise ValueError(f"bad gin configuration: {e}") from e
    finally:
        # The RunConfig carries everything; leftover global bindings would silently change the
        # defaults of any later MeshConfig() / TrainConfig() built in the same process.
        gin.clear_config()
