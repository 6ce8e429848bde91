"""The probe's settings: ``ProbeConfig`` and the modes (no torch here, so ``zoo probe --help`` starts at once)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MODES = ("fast", "protocol", "knn")
MODE_HELP = ("fast: features extracted once (cached), a linear layer trained on them (minutes); protocol: the paper's "
             "linear evaluation, a linear layer trained through the frozen encoder on augmented views (slow, the "
             "published number); knn: weighted k-nearest neighbours on the features, no training")


@dataclass
class ProbeConfig:
    """Every knob of the evaluator; ``configs/probe/*.yaml`` hold presets (ImageNet: the paper's numbers)."""

    epochs: int = 80
    batch_size: int = 1024
    lr_grid: tuple[float, ...] = (0.1, 0.2, 0.4, 0.8)  # base lr candidates (x batch / 256); our grid, not the paper's
    # a best lr at an edge of the grid (and better than its neighbour) adds lrs past it (x2 / x0.5), at most this
    # many; 0 (default): only say so, with the flag to widen it
    grid_extensions: int = 0
    # images held out of train to pick the lr (>= 1: a count, < 1: a fraction); None: 10,000 (the paper's ImageNet
    # split) for sets of 100k images or more, else 10 %
    heldout: float | None = None
    image_size: int = 224
    resize: int | None = 256
    train_augment: str = "random_resized_crop"  # or "center_crop" (the centre-crop-only probe)
    # the BYOL authors' views by default (augment.presets): eval view = central image_size/resize square resized
    # (eval_crop "official") or short side -> resize then centre crop ("resize_then_crop"); TF2 bicubic
    # ("tf_bicubic") or PyTorch's ("torch_bicubic"); train crop sampler "official" (one draw) or "torchvision"
    eval_crop: str = "official"
    resize_kernel: str = "tf_bicubic"
    crop_sampler: str = "official"
    # "batchnorm" (default): parameter-free BN before the linear layer, so one lr grid serves encoders whose features
    # have any scale (random-init and trained alike); "none": the paper's probe (configs/probe/imagenet_linear.yaml)
    feature_norm: str = "batchnorm"
    knn_k: tuple[int, ...] = (20, 200)
    knn_temperature: float = 0.07
    num_workers: int = 4
    extract_batch_size: int = 256
    # features on disk: "auto" = float16 on a GPU, float32 on a CPU; or float32 / float16 / bfloat16
    feature_dtype: str = "auto"
    shard_rows: int = 0  # rows per feature shard (the unit of resume); 0: ~64 MiB of features
    cache_dir: str | None = "default"  # "default" -> $ZOO_CACHE_DIR or ~/.cache/byol-zoo/features; null: no cache
    seed: int = 0
    max_train: int | None = None  # use only the first N training images (quick looks)
    max_test: int | None = None
    data_image_size: int = 32  # side of the embedded digits
    device: str = "auto"
    # devices per node and nodes: feature extraction (fast, knn) split over them, each rank extracting its share once
    # (zoo.eval.distributed); protocol mode: the trainer's DDP. On a CPU-only machine a device is one process.
    devices: int = 1
    num_nodes: int = 1
    # the frozen encoder's forward (extraction and protocol): "auto" = bf16 autocast on a GPU, fp32 on a CPU;
    # "bf16-mixed" (same: autocast only ever on CUDA) or "32-true" (fp32 everywhere). The heads always train in fp32.
    precision: str = "auto"
    progress: bool = True
    trainer: dict[str, Any] = field(default_factory=dict)  # overrides for zoo.train.trainer.build_trainer (protocol)

    def __post_init__(self) -> None:
        self.lr_grid = tuple(float(x) for x in self.lr_grid)
        self.knn_k = tuple(int(x) for x in self.knn_k)
        if not self.lr_grid:
            raise ValueError("lr_grid must hold at least one base learning rate")
        if self.train_augment not in ("random_resized_crop", "center_crop"):
            raise ValueError(f"train_augment={self.train_augment!r}: use random_resized_crop or center_crop")
        from augment.presets import EvalPreset

        EvalPreset(eval_crop=self.eval_crop, resize_kernel=self.resize_kernel, crop_sampler=self.crop_sampler)
        if self.feature_dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"feature_dtype={self.feature_dtype!r}: choose auto, float32, float16 or bfloat16")
        if self.precision not in ("auto", "32-true", "bf16-mixed"):
            raise ValueError(f"precision={self.precision!r}: choose auto, 32-true or bf16-mixed")
        if self.feature_norm not in ("none", "batchnorm"):
            raise ValueError(f"feature_norm={self.feature_norm!r}: choose none or batchnorm")
        if self.grid_extensions < 0:
            raise ValueError(f"grid_extensions={self.grid_extensions}: must be >= 0 (0: only say when the best lr "
                             "is at an edge of lr_grid)")
        if self.shard_rows < 0:
            raise ValueError(f"shard_rows={self.shard_rows}: must be >= 0 (0: ~64 MiB shards)")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs ({self.epochs}) and batch_size ({self.batch_size}) must be >= 1")
