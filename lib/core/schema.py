"""The config schema: one dataclass per section, every key with its default, type, unit and meaning.

The JSON key, the field name and the builder's keyword argument are the same string. `docs/configuration.md`
is generated from this file (`python -m lib.core.schema_doc`).
"""
import re
from dataclasses import dataclass, field

from lib.core.errors import ConfigError

INPUT_FEATURE = re.compile(r"dsm|filtered_height|relative_height_(\d+(?:\.\d+)?)m")  # group 1: window side W, m


def valid_input_feature(name) -> bool:
    """'dsm', 'filtered_height' (DSM minus the scene's ground filter), or 'relative_height_<W>m', W > 0 metres."""
    match = INPUT_FEATURE.fullmatch(str(name))
    return bool(match) and (match.group(1) is None or float(match.group(1)) > 0)


def opt(default, doc: str, **meta):
    """A schema field: default, one-line doc (with unit), optional choices/min/above (exclusive)/max; for a
    list the bounds apply to each item."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc, **meta})
    return field(default=default, metadata={"doc": doc, **meta})


@dataclass
class RunConfig:
    name: str = opt("default", "run name: outputs go to <output_root>/<name>/")
    output_root: str = opt("runs", "folder that holds run directories")
    seed: int = opt(0, "one seed for python, numpy, torch, data order and augmentation", min=0)
    deterministic: bool = opt(False, "cudnn deterministic, no benchmark (slower; for final runs)")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")


@dataclass
class DataConfig:
    task: str = opt("segmentation", "what the model predicts",
                    choices=("segmentation", "regression", "classification"))
    root: str = opt("data/synthetic", "dataset folder: shards and manifest.json")
    synthetic_sites: int = opt(12, "number of synthetic sites when no real site is listed; for task "
                               "classification without class_folder, synthetic tiles per stand type", min=0)
    synthetic_size_px: int = opt(1024, "side of each synthetic site in pixels", min=64, max=16384)
    synthetic_closed_fraction: float = opt(0.0, "share of synthetic sites made one closed stand with 0.5-5 % "
                                           "gaps (its own draw; the other sites are unchanged)", min=0.0, max=1.0)
    synthetic_coarse_fraction: float = opt(0.0, "share of synthetic sites seen by a sensor of synthetic_coarse_factor "
                                           "x larger pixels (e.g. 2 m LiDAR or photogrammetry), brought to "
                                           "pixel_size_m as predict.py brings such a scene: DSM bilinear, labels "
                                           "by nearest (its own draw; the other sites are unchanged)",
                                           min=0.0, max=1.0)
    synthetic_coarse_factor: int = opt(2, "pixel size of the coarse sensor, in multiples of pixel_size_m", min=2,
                                       max=8)
    sites: list[dict] = opt([], "real sites: [{name, dsm, chm | dtm}] paths to GeoTIFFs")
    raster_folder: str = opt("", "folder of <site>_DSM.tif with <site>_CHM.tif or <site>_DTM.tif")
    class_folder: str = opt("", "classification: folder of class subfolders of tiles")
    pixel_size_m: float = opt(1.0, "pixel size of the tiles in metres", above=0.0)
    tile_px: int = opt(256, "tile side in pixels", min=16, max=4096)
    stride_px: int = opt(256, "step between tiles in pixels (< tile_px overlaps, inside a split only)", min=1)
    min_valid_fraction: float = opt(0.7, "drop tiles with less valid (non-nodata) area", min=0.0, max=1.0)
    thresholds_m: list[float] = opt([2.0, 5.0, 10.0, 15.0], "gap height thresholds in metres, increasing",
                                        above=0.0)
    min_area_m2: float = opt(1.0, "smallest gap kept in the masks, m²", min=0.0)
    max_area_m2: float = opt(1.0e6, "largest gap kept in the masks, m²", min=0.0)
    split: str = opt("auto", "spatial split rule: by site, by blocks of tiles, or auto (site if enough sites)",
                     choices=("auto", "site", "block"))
    split_fractions: list[float] = opt([0.7, 0.15, 0.15], "train/val/test fractions", min=0.0, max=1.0)
    block_px: int = opt(1024, "block side in pixels for the block split", min=16)
    test_sites: list[str] = opt([], "site names held out as the test split")
    shard_mb: float = opt(128.0, "target shard size in MB", min=1.0)
    workers: int = opt(-1, "DataLoader workers; -1 picks from the environment", min=-1)
    cache: bool = opt(False, "keep decoded samples in memory after the first epoch (small datasets)")
    shuffle_buffer: int = opt(256, "samples in the shuffle buffer", min=1)
    calibrate: bool = opt(False, "try worker counts / prefetch factors at start and keep the fastest")
    input_features: list[str] = opt(["dsm"], "model input channels, computed on the fly from each DSM tile: "
                                    "dsm, relative_height_<W>m (DSM minus its grey opening over W metres); and "
                                    "filtered_height, the DSM minus the ground filter (lib/gaps/ground_filter.py) "
                                    "run over the whole site or scene, stored with each tile by prepare_data "
                                    "(context beyond the tile)")
    hybrid_chms: list[str] = opt([], "real CHM GeoTIFFs laid onto synthetic terrain as extra sites "
                                 "(real canopy, exact labels), mixed with the synthetic sites")
    hybrid_per_chm: int = opt(4, "hybrid sites per CHM, each on its own terrain and orientation", min=0)

    def __post_init__(self):
        bad = [f for f in self.input_features if not valid_input_feature(f)]
        if bad or not self.input_features or len(set(self.input_features)) != len(self.input_features):
            raise ConfigError(f"data.input_features must be distinct names 'dsm', 'filtered_height' or "
                              f"'relative_height_<W>m' (W > 0 metres), found {self.input_features}")
        if any(b <= a for a, b in zip(self.thresholds_m, self.thresholds_m[1:])):
            raise ConfigError(f"data.thresholds_m must be strictly increasing, found {self.thresholds_m}")
        if not self.thresholds_m:
            raise ConfigError("data.thresholds_m must list at least one threshold")
        if self.max_area_m2 < self.min_area_m2:
            raise ConfigError(f"data.max_area_m2 ({self.max_area_m2}) is below data.min_area_m2 "
                              f"({self.min_area_m2})")
        if len(self.split_fractions) != 3 or abs(sum(self.split_fractions) - 1) > 1e-6 \
                or min(self.split_fractions) < 0:
            raise ConfigError(f"data.split_fractions must be three non-negative numbers summing to 1, "
                              f"found {self.split_fractions}")


@dataclass
class ModelConfig:
    name: str = opt("unet_film_cbam", "architecture (see lib/models: an unknown name lists the valid ones)")
    base_channels: int = opt(32, "channels of the first encoder level (doubles per level)", min=1)
    depth: int = opt(4, "encoder levels (downsamplings)", min=1, max=7)
    norm: str = opt("adaptive", "normalisation layer", choices=("adaptive", "batch", "group", "none"))
    activation: str = opt("relu", "activation", choices=("relu", "leaky_relu", "gelu", "silu", "swish", "mish"))
    dropout: float = opt(0.1, "Dropout2d probability in the decoder / bottleneck", min=0.0, max=1.0)
    drop_path: float = opt(0.0, "maximum DropPath rate (rises linearly with depth; residual models)",
                           min=0.0, max=1.0)
    positional: bool = opt(False, "append x, y and distance-to-centre channels (the model adds them itself)")
    classical_prior: bool = opt(False, "segmentation: add the classical rule gain * (T - relative height) to the "
                                "logits, so the network learns corrections to it; needs a relative_height_<W>m "
                                "entry in data.input_features (lib/models/prior.py)")
    prior_trust_map: bool = opt(False, "with classical_prior: the network also sets the rule's knobs per pixel (a "
                                "trust that scales its gain; with several relative-height features, the window "
                                "mix), so the rule decides sharply where it is exact (flat ground) and fades "
                                "where it is not (slopes); the output layer starts at zero, so training starts "
                                "from the rule itself")
    prior_trust_scope: str = opt("pixel", "with prior_trust_map: the knobs per pixel, or one set per tile (the "
                                 "spatial mean of the network's knob channels over the tile or prediction "
                                 "window): a regional choice of trust and window, which cannot redraw pixels",
                                 choices=("pixel", "tile"))
    prior_initial_trust: float = opt(0.0, "with prior_trust_map: the trust knob where training starts, a "
                                     "log-factor on the rule's gain (2: the rule starts e^2 = 7.4x sharper); "
                                     "the network lowers it where the rule is wrong", min=-3.9, max=3.9)
    prior_bias: bool = opt(True, "with classical_prior: a learnt bias in the rule (one global shift of its "
                           "decision boundary); false keeps the boundary at relative height = T, so only the "
                           "knobs (which scale the rule's confidence) and the correction move decisions")
    prior_gate: bool = opt(False, "with classical_prior: a per-tile gate between the model and the classical "
                           "method itself (the sharp rule h <= T on prior_gate_channel), learnt (prior_gate_target) from "
                           "tile statistics of the inputs; predictions mix the two probabilities by its weight")
    prior_gate_channel: int = opt(-1, "with prior_gate: the relative-height channel whose sharp rule (h <= T) the "
                                  "gate hands tiles to, as a position among the relative-height input features "
                                  "(0 the first; -1 the last)")
    prior_gate_target: str = opt("tile", "with prior_gate: what trains the gate; tile: a per-tile target (is the "
                                 "classical decision right more often than the model's); mixture: the labels' BCE "
                                 "of the mixture it makes in prediction", choices=("tile", "mixture"))
    height_head: bool = opt(False, "with classical_prior: the network gives a canopy height (the classical "
                            "relative height plus its correction) and a spread, and p(gap at T) = "
                            "sigmoid((T - height) / spread): every threshold from one forward pass, nested by "
                            "construction; the network never sees T (lib/models/height_head.py)")
    height_head_pixel_mix: bool = opt(False, "with height_head: the network also chooses the mix of the "
                                      "relative-height channels per pixel (e.g. the opening on flat ground, the "
                                      "filter on slopes); false: one learnt mix for every pixel")
    attention_gates: bool = opt(False, "additive attention gates on the U-Net skips (U-Net family)")
    spectral_norm: bool = opt(False, "spectral normalisation of every conv and linear weight except FiLM's")
    blocks_per_stage: int = opt(2, "cnn_dilated: conv-norm-act blocks per stage", min=1)
    dilation_stage3: int = opt(2, "cnn_dilated: dilation (= padding) of the 3x3 convs of stage 3, pixels", min=1)
    extra: dict = opt({}, "architecture-specific keyword arguments (an unknown key lists the valid ones)")


@dataclass
class LossConfig:
    name: str = opt("focal_dice", "loss for the task (segmentation: bce, focal, dice, tversky, lovasz, focal_dice)")
    threshold_weights: list[float] = opt([], "per-threshold weights (empty: all 1)", min=0.0)
    extra: dict = opt({}, "loss-specific keyword arguments (focal gamma, tversky alpha/beta, ...)")
    focal_gamma: float = opt(2.0, "focal: focusing exponent (0 gives BCE)", min=0.0)
    focal_alpha: float | None = opt(None, "focal: weight of gap pixels, 1 - alpha for non-gap; null: unweighted",
                                    min=0.0, max=1.0)
    prior_correction_weight: float = opt(0.0, "with model.classical_prior: weight of the mean absolute "
                                         "correction (the network's logits added to the rule) in the training "
                                         "loss, so the network corrects the rule only where that pays and "
                                         "otherwise leaves the decision to the rule and its knobs (0: off)",
                                         min=0.0)
    prior_rule_weight: float = opt(0.0, "with model.classical_prior: weight of the task's loss on the rule's "
                                   "logits alone (without the correction), so its knobs (window, trust) make "
                                   "the rule right by itself where it can be instead of leaning on the "
                                   "correction (0: off)", min=0.0)
    focal_weight: float = opt(1.0, "focal_dice: weight of the focal term", min=0.0)
    dice_weight: float = opt(1.0, "focal_dice: weight of the Dice term", min=0.0)
    dice_smooth: float = opt(1.0, "dice/tversky: smoothing in pixels added to both sides of the ratio", min=0.0)
    tversky_alpha: float = opt(0.3, "tversky: weight of false positives", min=0.0)
    tversky_beta: float = opt(0.7, "tversky: weight of false negatives", min=0.0)
    adaptive_terms: list[str] = opt(["focal", "dice"], "adaptive: segmentation losses balanced by learned "
                                    "uncertainty weights (Kendall et al.)")
    huber_delta_m: float = opt(1.0, "huber (regression): error in metres where L2 turns into L1", above=0.0)
    label_smoothing: float = opt(0.0, "cross_entropy (classification): label smoothing", min=0.0, max=1.0)
    class_weights: list[float] = opt([], "cross_entropy (classification): per-class weights (empty: all 1)",
                                      min=0.0)


@dataclass
class OptimConfig:
    name: str = opt("adamw", "optimiser", choices=("adamw", "adam", "sgd"))
    lr: float = opt(1e-3, "peak learning rate", min=0.0)
    weight_decay: float = opt(1e-4, "decoupled weight decay (not on norms and biases)", min=0.0)
    momentum: float = opt(0.9, "SGD momentum / Adam beta1", min=0.0, max=1.0)
    nesterov: bool = opt(False, "Nesterov momentum (SGD)")
    grad_clip: float = opt(1.0, "gradient clipping threshold; 0 disables", min=0.0)
    clip_mode: str = opt("norm", "how to clip", choices=("norm", "value", "adaptive"))
    accumulate_steps: int = opt(1, "micro-batches per optimiser step", min=1)
    encoder_lr_scale: float = opt(1.0, "LR multiplier of the encoder's parameters (e.g. 0.1 when fine-tuning "
                                       "weights from --init-from)", min=0.0)


@dataclass
class ScheduleConfig:
    name: str = opt("warmup_cosine", "learning-rate schedule (pure function of the step): see lib/train/schedulers.py")
    warmup_steps: int = opt(100, "linear warmup steps (one_cycle and cyclic ramp up themselves)", min=0)
    min_lr_ratio: float = opt(0.01, "lowest LR as a fraction of the peak (end of cosine/poly, bottom of "
                               "restarts and cyclic, floor of reduce_on_plateau)", min=0.0, max=1.0)
    extra: dict = opt({}, "schedule-specific keyword arguments (period, gamma, milestones, ...)")
    restart_period_steps: int = opt(1000, "cosine_restarts: steps in the first cosine period", min=1)
    restart_period_mult: int = opt(1, "cosine_restarts: each period is this many times the previous", min=1)
    pct_start: float = opt(0.3, "one_cycle: fraction of the steps spent rising to the peak", min=0.0, max=1.0)
    div_factor: float = opt(25.0, "one_cycle: starting LR = peak / div_factor", min=1.0)
    final_div_factor: float = opt(1.0e4, "one_cycle: final LR = starting LR / final_div_factor", min=1.0)
    cycle_half_steps: int = opt(2000, "cyclic: steps from the low LR (min_lr_ratio x peak) to the peak", min=1)
    decay_every_steps: int = opt(1000, "step: multiply the LR by gamma every this many steps", min=1)
    milestone_steps: list[int] = opt([], "multistep: steps at which the LR is multiplied by gamma, increasing",
                                       min=0)
    gamma: float = opt(0.1, "step/multistep: LR multiplier at each decay", min=0.0)
    poly_power: float = opt(0.9, "poly: exponent of (1 - progress)", min=0.0)
    plateau_factor: float = opt(0.1, "reduce_on_plateau: LR multiplier on a plateau", min=0.0, max=1.0)
    plateau_patience: int = opt(10, "reduce_on_plateau: validations without improvement tolerated", min=0)
    plateau_cooldown: int = opt(0, "reduce_on_plateau: validations ignored after a reduction", min=0)
    plateau_threshold: float = opt(1e-4, "reduce_on_plateau: relative change that counts as improvement",
                                   min=0.0)


@dataclass
class TrainConfig:
    epochs: int = opt(30, "training epochs", min=1)
    max_steps: int = opt(0, "stop after this many optimiser steps; 0 = no limit", min=0)
    batch_size: int = opt(16, "samples per batch per device", min=1)
    amp: str = opt("auto", "mixed precision", choices=("auto", "bf16", "fp16", "off"))
    compile: bool = opt(False, "torch.compile the model")
    channels_last: bool = opt(False, "channels_last memory format")
    ema_decay: float = opt(0.0, "EMA of weights; 0 disables", min=0.0, max=1.0)
    threshold_sampling: str = opt("uniform", "per-sample threshold draw: one of data.thresholds_m (uniform, "
                                  "rare), or continuous T in threshold_range_m with target CHM <= T and no area "
                                  "filter: T ~ U(range) (continuous) or log T ~ U(log range) (continuous_log: "
                                  "as many draws in 1-5 m as in 5-25 m)",
                                  choices=("uniform", "rare", "continuous", "continuous_log"))
    threshold_range_m: list[float] = opt([1.0, 30.0], "continuous sampling: lowest and highest threshold, metres",
                                         min=0.0)
    early_stopping_patience: int = opt(10, "epochs without improvement before stopping; 0 disables", min=0)
    monitor: str = opt("val/iou_mean", "metric that picks best.ckpt and drives early stopping")
    monitor_mode: str = opt("max", "whether the monitored metric should rise or fall", choices=("max", "min"))
    checkpoint_every_steps: int = opt(0, "also write last.ckpt every N steps; 0 = only at epoch ends", min=0)
    val_every_epochs: int = opt(1, "validate every N epochs", min=1)
    freeze_encoder_epochs: int = opt(0, "transfer learning: the encoder gets no update for the first N epochs",
                                     min=0)
    sync_batchnorm: bool = opt(False, "DDP: BatchNorm statistics over all ranks (SyncBatchNorm; CUDA only)")
    profile_steps: int = opt(0, "PyTorch profiler over the first N optimiser steps, trace in <run>/profile/; "
                                "0 = off", min=0)
    adaptive_regularization: bool = opt(False, "raise dropout and weight decay when the val - train loss gap "
                                               "widens for two validations in a row")
    regularization_factor: float = opt(1.5, "adaptive_regularization: multiplier of dropout and weight decay "
                                            "at each raise", min=1.0)
    max_dropout: float = opt(0.5, "adaptive_regularization: dropout is never raised above this", min=0.0, max=1.0)


    def __post_init__(self):
        r = self.threshold_range_m
        if len(r) != 2 or not 0 <= r[0] < r[1]:
            raise ConfigError(f"train.threshold_range_m must be two increasing thresholds >= 0 metres, found {r}")
        if self.threshold_sampling == "continuous_log" and r[0] <= 0:
            raise ConfigError(f"train.threshold_sampling continuous_log needs threshold_range_m above 0 m, found {r}")


@dataclass
class AugmentConfig:
    enabled: bool = opt(True, "apply batch augmentations during training")
    flip_p: float = opt(0.5, "probability of a flip/rot90 (one of the 7 non-identity D4 elements; 7/8 = uniform D4)",
                        min=0.0, max=1.0)
    affine_p: float = opt(0.0, "probability of a small rotation/scale (bilinear heights, nearest masks)",
                          min=0.0, max=1.0)
    rotate_deg: float = opt(10.0, "largest angle of the small rotation, degrees", min=0.0, max=45.0)
    scale_frac: float = opt(0.1, "largest relative horizontal zoom of the small affine (0.1: x0.9 to x1.1)",
                            min=0.0, max=0.5)
    offset_p: float = opt(1.0, "probability of a random elevation offset on the DSM", min=0.0, max=1.0)
    offset_m: float = opt(100.0, "random elevation offset range in metres (normalisation must ignore it)", min=0.0)
    noise_p: float = opt(0.5, "probability of Gaussian noise on the DSM", min=0.0, max=1.0)
    noise_std_m: float = opt(0.1, "Gaussian noise in metres", min=0.0)
    holes_p: float = opt(0.2, "probability of random nodata rectangles (DSM/CHM NaN, masks 255)", min=0.0, max=1.0)
    holes_max: int = opt(3, "most nodata rectangles per sample", min=1, max=16)
    hole_max_frac: float = opt(0.25, "largest nodata rectangle side as a fraction of the tile side",
                               min=0.0, max=1.0)
    cutout_p: float = opt(0.0, "probability of a cutout: one rectangle of the DSM flattened to its mean, "
                               "masks 255 and CHM NaN there", min=0.0, max=1.0)
    cutout_max_frac: float = opt(0.3, "largest cutout side as a fraction of the tile side", min=0.0, max=1.0)
    jitter_p: float = opt(0.5, "classification: probability of per-band contrast/brightness jitter",
                          min=0.0, max=1.0)
    band_jitter: float = opt(0.1, "classification: band -> mean + g*(band - mean) + s*std, g in 1 +- this, "
                                  "s in +- this", min=0.0, max=1.0)


@dataclass
class LogConfig:
    tensorboard: bool = opt(True, "write TensorBoard events")
    progress_every_steps: int = opt(20, "progress line every N steps when stdout is not a TTY", min=1)
    images_every_epochs: int = opt(5, "prediction panels every N epochs; 0 disables", min=0)
    grad_norms_every_steps: int = opt(10, "per-layer gradient norms (TensorBoard) and their alerts every N "
                                      "optimiser steps; 0 disables", min=0)
    grad_vanishing_norm: float = opt(1e-7, "alert when a layer's gradient norm falls below this", min=0.0)
    grad_exploding_norm: float = opt(100.0, "alert when a layer's gradient norm rises above this", min=0.0)


@dataclass
class EvalConfig:
    split: str = opt("test", "split to evaluate", choices=("train", "val", "test"))
    tta: bool = opt(False, "average the D4 transforms at test time")
    batch_size: int = opt(16, "evaluation batch size", min=1)
    classical_window_m: float = opt(51.0, "classical DSM-only baseline: side of the grey-opening window, "
                                          "metres (wider than the largest gap)", above=0.0)
    size_bounds_m2: list[float] = opt([25.0, 400.0], "gap-size classes for recall, m²: small < first, "
                                                      "medium up to second, large above", min=0.0)
    panels: int = opt(4, "example tiles drawn as TensorBoard panels (each at every threshold)", min=0)

    def __post_init__(self):
        if len(self.size_bounds_m2) != 2 or not 0 <= self.size_bounds_m2[0] <= self.size_bounds_m2[1]:
            raise ConfigError(f"eval.size_bounds_m2 must be two increasing areas in m², found {self.size_bounds_m2}")


@dataclass
class PredictConfig:
    window_px: int = opt(256, "window side in pixels", min=16, max=8192)
    overlap: float = opt(0.25, "fraction of the window shared with its neighbours", min=0.0, max=0.9)
    batch_size: int = opt(8, "windows per forward pass (a threshold-conditioned model runs them once per "
                                     "threshold)", min=1)
    tta: bool = opt(False, "average the D4 transforms at test time")
    prob_threshold: float = opt(0.5, "probability above which a pixel is mapped as gap", min=0.0, max=1.0)
    write_prob: bool = opt(False, "also write prob_<T>m.tif (float32 probabilities, NaN nodata)")
    compile: bool = opt(False, "torch.compile the model (pays off on large scenes)")
    nested: bool = opt(True, "make the gap maps nest: probabilities cumulative-maxed over increasing "
                             "thresholds, so the map at T lies inside the map at every T' > T")


@dataclass
class SearchConfig:
    name: str = opt("search", "search name: trials go to <run.output_root>/<name>/<trial id>/")
    grid: dict = opt({}, "dotted config keys -> list of values (grid_search.py --grid FILE replaces it)")
    trials: int = opt(0, "random trials drawn from the grid; 0 = the full grid", min=0)
    seed: int = opt(0, "seed of the random draw of trials (every trial trains with run.seed)", min=0)
    epochs: int = opt(2, "epochs per trial (of the first rung with successive halving)", min=1)
    workers: int = opt(1, "trials at once, each in its own process (one GPU each when there are GPUs)", min=1)
    halving_rungs: int = opt(0, "successive halving: rungs after the first; each keeps the best keep_fraction "
                                "of the points and trains them round(1/keep_fraction) times longer; 0 = off", min=0)
    keep_fraction: float = opt(0.5, "successive halving: fraction of the points kept after each rung",
                               min=0.01, max=1.0)
    folds: int = opt(0, "k-fold over the train+val sites, mean +- std per point (architecture benchmark); "
                        "0 = the dataset's own split", min=0)

    def __post_init__(self):
        if self.folds == 1:
            raise ConfigError("search.folds=1 is not a k-fold: use 0 (the dataset's own split) or k >= 2")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    search: SearchConfig = field(default_factory=SearchConfig)

    def __post_init__(self):
        stride = 4 if self.model.name == "cnn_dilated" else 2 ** self.model.depth  # = lib.models.stride_of
        if self.data.tile_px % stride:
            raise ConfigError(f"data.tile_px ({self.data.tile_px}) must be divisible by the model stride "
                              f"{stride} (2**model.depth)")

