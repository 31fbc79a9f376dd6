"""The `train` stage's configuration (`./run.sh train ...`), its checks, and the parsed layer map."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.errors import ConfigError
from pipeline.geometry import CLASSIFIER_LOSSES, FEATURE_LOSSES, TokenRule
from pipeline.train.ds_config import PRECISIONS, global_batch

MODES = ("sft", "distill")
LOSS_CHOICES = (*FEATURE_LOSSES, *CLASSIFIER_LOSSES, "none")
KD_SOURCES = ("auto", "final", "topk", "class", "none")  # class: an encoder classifier's stored class logits
FEATURE_ROWS = ("tokens", "cls")
TEACHER_MODES = ("auto", "stored", "online")
NONFINITE = ("stop", "skip")

# Fields that may change between a run and its --resume without changing what is trained (grad_accum: as long
# as grad_accum x ranks, and so the global batch, stays; pipeline/train/loop.py checks that).
RESUME_FREE_FIELDS = frozenset({
    "resume", "grad_accum", "stop_after", "nproc", "local_rank", "num_workers", "prefetch_factor", "progress",
    "log_every", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_samples", "valid_features", "out",
    "nonfinite",
})


@dataclass
class TrainConfig:
    mode: Literal[MODES] = field(default="sft", metadata={"help": "sft (cross-entropy only) or distill"})
    data: str = field(default="", metadata={"help": "prepared data folder (./run.sh prepare --out)"})
    student: str = field(default="", metadata={"help": "model directory or preset:NAME to train"})
    out: str = field(default="", metadata={"help": "run folder: checkpoints, TensorBoard, consolidated model/"})
    teacher: str = field(default="", metadata={
        "help": "teacher model dir/preset: required for --teacher_mode online; with stored features, only checked "
                "against the store's teacher fingerprint"})
    features: str = field(default="", metadata={"help": "feature store of the train split (./run.sh cache)"})
    valid_features: str = field(default="", metadata={
        "help": "feature store of the validation split, for D_P / D_FG / D_CKA on validation (optional)"})
    teacher_mode: Literal[TEACHER_MODES] = field(default="auto", metadata={
        "help": "stored (stream --features), online (teacher forward each step) or auto (stored if --features)"})
    loss: Literal[LOSS_CHOICES] = field(default="procrustes", metadata={
        "help": f"feature loss: {', '.join(LOSS_CHOICES)}"})
    alpha: float = field(default=0.5, metadata={"help": "KD weight a in (1-a) CE + a KD + b sum_l w_l D(l)"})
    beta: float = field(default=1.0, metadata={"help": "feature-loss weight b"})
    layer_map: list[str] = field(default_factory=list, metadata={
        "help": "student:teacher hidden-state pairs, e.g. 1:2 2:4; default: n_layer_pairs spaced over depth"})
    layer_weights: list[float] = field(default_factory=list, metadata={
        "help": "w_l per pair (default 1/n_pairs each)"})
    n_layer_pairs: int = field(default=2, metadata={"help": "pairs of the default layer map"})
    kd: Literal[KD_SOURCES] = field(default="auto", metadata={
        "help": "KD source: final (exact logits from the stored final state), topk, class (a classifier's class "
                "logits), none, auto (class on classification data, else final if stored, else topk, else none when "
                "alpha is 0)"})
    kd_temperature: float = field(default=1.0, metadata={"help": "KD temperature"})
    feature_rows: Literal[FEATURE_ROWS] = field(default="tokens", metadata={
        "help": "classification tasks: the rows the feature distances compare: tokens (every token of the batch, as "
                "for decoders) or cls (one [CLS] row per example); pkd always compares [CLS] rows"})
    token_rule: str = field(default="outliers:4", metadata={
        "help": "token rows the feature loss compares: outliers:C leaves out rows whose centred teacher norm is above "
                "C x the median (massive activations), all, rownorm, outliers:C+rownorm"})
    ds_config: str = field(default="ds_configs/auto.json", metadata={
        "help": "DeepSpeed JSON (ds_configs/); auto.json picks the ZeRO stage for the run (0 on one rank, else 2)"})
    precision: Literal[PRECISIONS] = field(default="auto", metadata={
        "help": "fp32, bf16, fp16, or auto (the JSON's choice; else bf16 on a GPU, fp32 on CPU)"})
    micro_batch_size: int = field(default=4, metadata={"help": "samples per rank per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    adam_beta1: float = field(default=0.9)
    adam_beta2: float = field(default=0.999)
    adam_eps: float = field(default=1e-8)
    warmup_steps: int = field(default=-1, metadata={"help": "linear warmup steps; -1: warmup_ratio of the run"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "warmup fraction when warmup_steps is -1"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decays to lr * min_lr_ratio"})
    grad_clip: float = field(default=1.0, metadata={"help": "global gradient-norm clip (0: off)"})
    epochs: int = field(default=1, metadata={"help": "passes over the train split (when max_steps is 0)"})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps of the whole run (0: from epochs)"})
    seed: int = field(default=0, metadata={"help": "seed of preset weights, projections, data order, dropout"})
    activation_checkpointing: str = field(default="auto", metadata={
        "help": "recompute layer activations in backward: true, false, or auto (on when a micro-batch's activations "
                "would not fit the device beside the model states; off on a CPU)"})
    train_split: str = field(default="train")
    valid_split: str = field(default="valid", metadata={"help": "validation split ('' to skip validation)"})
    eval_every: int = field(default=0, metadata={"help": "validate every N steps (0: at the end only)"})
    eval_samples: int = field(default=256, metadata={"help": "validation samples used (0: all)"})
    log_every: int = field(default=1, metadata={"help": "TensorBoard/metrics.jsonl every N steps"})
    checkpoint_every: int = field(default=200, metadata={"help": "DeepSpeed checkpoint every N steps (0: end only)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "newest checkpoints kept (0: all)"})
    stop_after: int = field(default=0, metadata={
        "help": "end this invocation after N optimizer steps, with a checkpoint (for job time limits); "
                "--resume continues; the schedule still spans the whole run"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in --out"})
    nonfinite: Literal[NONFINITE] = field(default="stop", metadata={
        "help": "on a NaN/inf loss: stop (exit 2 naming the step; no model is saved) or skip (that micro-batch "
                "adds no gradient; counted as skipped_nonfinite in the metrics)"})
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes per rank"})
    prefetch_factor: int = field(default=4, metadata={"help": "batches each worker prepares ahead"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bar on rank 0"})
    nproc: int = field(default=1, metadata={
        "help": "ranks on this machine: >1 relaunches the stage under torchrun (skip when you launch yourself)"})
    local_rank: int = field(default=-1, metadata={"help": "set by the deepspeed launcher; LOCAL_RANK is used"})

    def global_batch(self, world_size: int) -> int:
        """Samples per optimizer step over all ranks."""
        return global_batch(self.micro_batch_size, self.grad_accum, world_size)

    def check(self) -> None:
        """Reject unusable option combinations up front, naming the option."""
        for name in ("data", "student", "out"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        choices = (("mode", MODES), ("loss", LOSS_CHOICES), ("kd", KD_SOURCES), ("nonfinite", NONFINITE),
                   ("feature_rows", FEATURE_ROWS),
                   ("teacher_mode", TEACHER_MODES), ("precision", PRECISIONS))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name} {getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        ac = str(self.activation_checkpointing).lower()  # a YAML `true` arrives as a bool
        self.activation_checkpointing = {"on": "true", "off": "false"}.get(ac, ac)
        if self.activation_checkpointing not in ("auto", "true", "false"):
            raise ConfigError(f"--activation_checkpointing {ac!r}: choose auto, true or false")
        for name in ("micro_batch_size", "grad_accum", "epochs", "nproc", "log_every", "prefetch_factor"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "stop_after", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_samples",
                     "num_workers", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"--alpha {self.alpha}: must be in [0, 1]")
        if self.beta < 0:
            raise ConfigError(f"--beta {self.beta}: must be >= 0")
        TokenRule.parse(self.token_rule)  # a typo is a ConfigError naming the choices
        if self.kd_temperature <= 0:
            raise ConfigError(f"--kd_temperature {self.kd_temperature}: must be > 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0 or not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError("--min_lr_ratio must be in [0, 1] and --warmup_ratio in [0, 1)")
        if self.lr <= 0:
            raise ConfigError(f"--lr {self.lr}: must be > 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"--{name} {getattr(self, name)}: must be in [0, 1)")
        if self.adam_eps <= 0:
            raise ConfigError(f"--adam_eps {self.adam_eps}: must be > 0")
        if self.warmup_steps < -1:
            raise ConfigError(f"--warmup_steps {self.warmup_steps}: give steps >= 0, or -1 for --warmup_ratio")
        pairs = parse_layer_map(self.layer_map)
        if self.layer_weights and len(self.layer_weights) != len(pairs or [None] * self.n_layer_pairs):
            raise ConfigError(f"--layer_weights has {len(self.layer_weights)} values for "
                              f"{len(pairs or [None] * self.n_layer_pairs)} layer pairs")
        if self.mode == "sft":
            return
        if self.teacher_mode == "stored" and not self.features:
            raise ConfigError("--teacher_mode stored needs --features (a store from ./run.sh cache)")
        if self.teacher_mode == "online" and not self.teacher:
            raise ConfigError("--teacher_mode online needs --teacher")
        if self.teacher_mode == "auto" and not (self.features or self.teacher):
            raise ConfigError("--mode distill needs --features (stored teacher features) or --teacher (online teacher)")
        if self.alpha == 0 and (self.beta == 0 or self.loss == "none"):
            raise ConfigError("--mode distill with --alpha 0 and no feature loss is SFT; use --mode sft")


def parse_layer_map(items: list[str]) -> list[tuple[int, int]] | None:
    """`["1:2", "2:4"]` -> [(1, 2), (2, 4)]; an empty list means the default map."""
    if not items:
        return None
    pairs = []
    for item in items:
        parts = str(item).replace(",", ":").split(":")
        try:
            s, t = (int(p) for p in parts)
        except ValueError:
            raise ConfigError(f"--layer_map {item!r}: expected STUDENT:TEACHER hidden-state indices, "
                              f"e.g. 2:4") from None
        pairs.append((s, t))
    return pairs


def teacher_mode(cfg: TrainConfig) -> str:
    """The resolved teacher mode: "none" (sft), "stored" or "online"."""
    if cfg.mode == "sft":
        return "none"
    if cfg.teacher_mode != "auto":
        return cfg.teacher_mode
    return "stored" if cfg.features else "online"


def check_train_steps(runs: list[list[str]]) -> None:
    """The training steps a demo or study will run (`["stages.train", *options]` lists), each through train's own
    parser and checks before the first one starts: a bad value costs a second, not the steps before it."""
    from pipeline.config import parse_config

    for args in runs:
        parse_config(TrainConfig, args[1:]).check()


def pair_key(s: int, t: int) -> str:
    """A layer pair's name in logs and metrics: s<student hidden state>_t<teacher hidden state>."""
    return f"s{s}_t{t}"


def pair_name(loss: str, s: int, t: int) -> str:
    return f"{loss}/{pair_key(s, t)}"
