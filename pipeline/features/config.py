"""The `cache` stage's configuration (`./run.sh cache ...`) and its checks."""
from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.errors import ConfigError
from pipeline.features.quant import QMAX
from pipeline.runtime import dtype_name


@dataclass
class CacheConfig:
    data: str = field(default="", metadata={"help": "prepared data folder (./run.sh prepare)"})
    teacher: str = field(default="", metadata={"help": "teacher model directory or preset:NAME"})
    out: str = field(default="", metadata={"help": "output folder of the feature store"})
    split: str = field(default="train", metadata={"help": "which prepared split to cache"})
    layers: list[int] = field(default_factory=list, metadata={"help": "hidden-state indices (0 = embeddings)"})
    final: bool = field(default=False, metadata={"help": "also store the LM head's input (exact logits via the "
                                                          "LM-head weight saved beside the store)"})
    topk_logits: int = field(default=0, metadata={"help": "also store the top-k teacher log-probabilities"})
    dtype: str = field(default="bf16", metadata={"help": "stored dtype: bf16, fp16 or fp32 (or bfloat16, ...); "
                                                            "with --quant, the dtype reads come back in"})
    teacher_dtype: str = field(default="auto", metadata={"help": "compute dtype; auto = bf16 on GPU, fp32 on CPU"})
    quant: str = field(default="auto", metadata={"help": "int8, fp8 or int4: store codes with per-group bf16 "
                                                         "scales, read back in --dtype; none: store --dtype itself; "
                                                         "auto: int8 (none with low-rank storage)"})
    quant_group: int = field(default=-1, metadata={"help": "channels per scale, 0 = one per token; -1: the kind's "
                                                           "default (int8/fp8 64, int4 32), or the largest power of "
                                                           "two below it dividing every stored width"})
    rotate: bool = field(default=True, metadata={
        "help": "rotate each layer by a seeded orthogonal matrix before quantizing (spreads massive channels; "
                "distances unchanged); fp8 measured better without (--rotate false); no effect with --quant none"})
    quant_fit_tokens: int = field(default=4096, metadata={"help": "tokens sampled to fit the per-channel means "
                                                                   "subtracted before quantizing; 0 = none"})
    lowrank_k: int = field(default=0, metadata={"help": "store k PCA coefficients per token for each layer"})
    lowrank_energy: float = field(default=0.0, metadata={"help": "or the least k keeping this variance fraction"})
    lowrank_fit_tokens: int = field(default=200_000, metadata={"help": "tokens sampled to fit the PCA bases"})
    seed: int = field(default=0, metadata={"help": "seed of preset teacher weights and of the PCA sample"})
    shard_tokens: int = field(default=65_536, metadata={"help": "tokens per shard (unit of work and of resume)"})
    batch_tokens: int = field(default=8192, metadata={"help": "padded tokens per teacher batch"})
    max_batch_size: int = field(default=64, metadata={"help": "samples per teacher batch at most"})
    writer_threads: int = field(default=0, metadata={"help": "threads writing and hashing shards; 0 = by core count"})
    verify: bool = field(default=False, metadata={"help": "only verify the store in --out"})
    finalize: bool = field(default=False, metadata={"help": "only write the manifest of --out"})
    progress: bool = field(default=True, metadata={"help": "progress bar on rank 0"})

    def check(self) -> None:
        if not self.out:
            raise ConfigError("--out is required")
        if self.verify or self.finalize:
            return
        for name in ("data", "teacher"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        # Manifests keep one spelling per dtype, whichever the user typed.
        self.dtype = dtype_name(self.dtype, "dtype")
        self.teacher_dtype = dtype_name(self.teacher_dtype, "teacher_dtype", allow_auto=True)
        if self.topk_logits < 0:
            raise ConfigError(f"--topk_logits must be >= 0 (0: none), got {self.topk_logits}")
        if not self.layers and not self.final and not self.topk_logits:
            raise ConfigError("nothing to cache: give --layers, --final and/or --topk_logits")
        if len(set(self.layers)) != len(self.layers) or any(x < 0 for x in self.layers):
            raise ConfigError(f"--layers {self.layers}: distinct hidden-state indices >= 0 expected")
        if self.lowrank_k and self.lowrank_energy:
            raise ConfigError("give --lowrank_k or --lowrank_energy, not both")
        if not 0.0 <= self.lowrank_energy <= 1.0 or self.lowrank_k < 0:
            raise ConfigError("--lowrank_energy must be in (0, 1] and --lowrank_k >= 0")
        lowrank = bool(self.lowrank_k or self.lowrank_energy)
        if self.quant == "auto":  # BENCHMARKS.md, "A quantized feature store": students cannot tell int8 from bf16
            self.quant = "none" if lowrank else "int8"
        if self.quant not in (*QMAX, "none"):
            raise ConfigError(f"--quant {self.quant!r}: choose {', '.join(QMAX)}, none or auto")
        if self.quant != "none":
            if lowrank:
                raise ConfigError("--quant and low-rank storage do not combine: choose one (--quant none)")
            if self.quant_group < -1:
                raise ConfigError(f"--quant_group must be -1 (default), 0 (per token) or positive, got "
                                  f"{self.quant_group}")
            if self.quant_fit_tokens < 0:
                raise ConfigError(f"--quant_fit_tokens must be >= 0, got {self.quant_fit_tokens}")
        elif self.quant_group != -1:
            raise ConfigError("--quant_group applies to quantized stores, not --quant none")
        if (self.lowrank_k or self.lowrank_energy) and not self.layers:
            raise ConfigError("low-rank storage applies to --layers (the final state stays full for exact logits)")
