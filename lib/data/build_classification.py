"""Build a tile-classification dataset: labelled tiles -> stratified split -> tar shards -> manifest.

Tiles come from `data.class_folder` (one subfolder per class holding GeoTIFF or .npy tiles, the layout of
EuroSAT's multispectral release) or, when it is empty, from the synthetic stand types (lib/synthetic,
`data.synthetic_sites` tiles per type). Each sample holds `image.npy` (C, H, W) float32 and a json with
the label, the class name and where the tile came from. The split is stratified (every class keeps the
`data.split_fractions` ratios) and seeded, unless the folder has split files `train.txt`, `val.txt`,
`test.txt` listing tile paths relative to it (one per line). Per-band mean/std of the train split go into
the manifest (lib/bands).
"""
import contextlib
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from lib.data.bands import BandStats
from lib.data.build_segmentation import FORMAT_VERSION, commit_staged
from lib.core.errors import DataError
from lib.data.shards import ShardWriter, write_manifest
from lib.data.tiling import SPLITS

TILE_SUFFIXES = (".tif", ".tiff", ".npy")


@dataclass
class LabelledTile:
    label: int
    load: Callable[[], np.ndarray]  # -> (C, H, W) float32, NaN = nodata
    provenance: dict = field(default_factory=dict)


def read_tile(path: Path) -> np.ndarray:
    """A .npy ((H, W) or (C, H, W)) or GeoTIFF tile as float32 (C, H, W)."""
    if path.suffix.lower() == ".npy":
        try:
            image = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not a readable .npy tile ({exc})") from None
        if image.ndim not in (2, 3) or image.dtype.kind not in "uif":
            raise DataError(f"{path}: tile is {image.dtype} of shape {image.shape}, expected numbers (H, W) "
                            f"or (C, H, W)")
        return np.asarray(image[None] if image.ndim == 2 else image, np.float32)
    from lib.geoio.geotiff_read import read_bands
    with warnings.catch_warnings():  # tiles need no georeferencing: its absence is not news
        warnings.filterwarnings("ignore", message=".*no georeferencing")
        return read_bands(path)


def folder_tiles(folder) -> tuple[list[str], list[LabelledTile]]:
    """Class names (sorted subfolder names) and one tile per .tif/.tiff/.npy file in them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data.class_folder {str(folder)!r} is not a folder")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    tiles = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in TILE_SUFFIXES)
        if not files:
            raise DataError(f"class folder {folder / name} holds no {'/'.join(TILE_SUFFIXES)} tile")
        tiles += [LabelledTile(label, lambda p=p: read_tile(p), {"file": p.relative_to(folder).as_posix()})
                  for p in files]
    if len(classes) < 2:
        raise DataError(f"data.class_folder {folder} has {len(classes)} class subfolder(s), expected >= 2")
    return classes, tiles


def synthetic_tiles(per_class: int, size_px: int, pixel_size_m: float, seed: int):
    """Class names (lib.data.synthetic.STAND_TYPES) and `per_class` DSM tiles of each, reproducible from seed.

    The image is the DSM minus its 5th percentile, (1, H, W) metres: absolute elevation says nothing
    about the stand type, so it is removed here rather than learned away.
    """
    from lib.data.synthetic import STAND_TYPES, generate_stand_tile

    def load(tile_seed: int, label: int) -> np.ndarray:
        dsm = generate_stand_tile(tile_seed, label, size_px, pixel_size_m)
        return (dsm - np.nanpercentile(dsm, 5))[None].astype(np.float32)

    tiles = []
    for i in range(per_class):
        for label in range(len(STAND_TYPES)):
            tile_seed = seed * 100_003 + i * len(STAND_TYPES) + label
            tiles.append(LabelledTile(label, lambda s=tile_seed, k=label: load(s, k),
                                      {"source": "synthetic", "seed": tile_seed}))
    return list(STAND_TYPES), tiles


def stratified_split(labels, fractions, seed: int) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) per tile: each class is shuffled and cut at `fractions`."""
    labels = np.asarray(labels)
    split = np.empty(len(labels), np.int64)
    rng = np.random.default_rng(seed)
    bounds = np.cumsum(fractions)[:2]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cuts = np.round(bounds * len(members)).astype(int)                  # train | val | test
        for i, part in enumerate(np.split(members, cuts)):
            split[part] = i
    return split


def file_split(folder: Path, tiles: list[LabelledTile]) -> np.ndarray | None:
    """The split from the folder's train.txt/val.txt/test.txt (None when it has none); every tile once."""
    lists = {s: folder / f"{s}.txt" for s in SPLITS}
    if not any(p.is_file() for p in lists.values()):
        return None
    index = {t.provenance["file"]: i for i, t in enumerate(tiles)}
    split = np.full(len(tiles), -1, np.int64)
    for s, path in enumerate(lists.values()):
        names = path.read_text(encoding="utf-8").split() if path.is_file() else []
        unknown = [n for n in names if n not in index]
        if unknown:
            raise DataError(f"{path}: {len(unknown)} listed tile(s) not found under {folder}, e.g. {unknown[0]!r}",
                            hint="list paths relative to data.class_folder, like <class>/<tile>.tif")
        twice = [n for n in names if split[index[n]] >= 0]
        if twice:
            raise DataError(f"{path}: tile {twice[0]!r} is listed in more than one split file")
        split[[index[n] for n in names]] = s
    return split


class _Writer:
    """Shard writers of the three splits, per-class tallies and the train-split band statistics."""

    def __init__(self, stage: Path, max_bytes: int, num_classes: int):
        self.shards = {s: ShardWriter(stage, s, max_bytes=max_bytes) for s in SPLITS}
        self.counts = np.zeros((len(SPLITS), num_classes), np.int64)       # (split, class)
        self.stats = BandStats()
        self.shape = None

    def write(self, index: int, tile: LabelledTile, split: int, class_names, tile_px: int) -> None:
        image = tile.load()                                                  # (C, H, W) float32
        where = tile.provenance.get("file", f"tile {index}")
        if self.shape is None and image.shape[1:] != (tile_px, tile_px):
            raise DataError(f"{where}: tile is {image.shape[1]}x{image.shape[2]} px but data.tile_px is {tile_px}",
                            hint=f"set --data.tile_px={image.shape[1]}" if image.shape[1] == image.shape[2] else None)
        if self.shape is not None and image.shape != self.shape:
            raise DataError(f"{where}: tile has shape {image.shape}, earlier tiles {self.shape}: all tiles "
                            f"need the same bands and size")
        self.shape = image.shape
        name = class_names[tile.label]
        self.shards[SPLITS[split]].write({
            "__key__": f"c{tile.label:03d}_{index:07d}", "image.npy": np.ascontiguousarray(image),
            "json": {"label": tile.label, "class_name": name, "split": SPLITS[split], **tile.provenance}})
        self.counts[split, tile.label] += 1
        if split == 0:
            self.stats.add(image)

    def abort(self) -> None:
        for writer in self.shards.values():
            with contextlib.suppress(OSError):
                writer.abort()


def build_class_dataset(cfg, out) -> dict:
    """Write the classification shards and manifest into `out` (built in out/.staging, then committed)."""
    d = cfg.data
    if d.class_folder:
        class_names, tiles = folder_tiles(d.class_folder)
        split = file_split(Path(d.class_folder), tiles)
        rule = "files" if split is not None else "stratified"
    else:
        class_names, tiles = synthetic_tiles(d.synthetic_sites, d.tile_px, d.pixel_size_m, cfg.run.seed)
        split, rule = None, "stratified"
    if split is None:
        split = stratified_split([t.label for t in tiles], d.split_fractions, cfg.run.seed)
    out = Path(out)
    stage = out / ".staging"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    writer = _Writer(stage, int(d.shard_mb * 2**20), len(class_names))
    try:
        for i, tile in enumerate(tiles):
            if split[i] >= 0:  # tiles in no split file are left out
                writer.write(i, tile, int(split[i]), class_names, d.tile_px)
        if not writer.counts[0].any():
            raise DataError("no training tile: the train split is empty")
        shards = {s: w.close() for s, w in writer.shards.items()}
        manifest = _manifest(cfg, class_names, rule, shards, writer)
        write_manifest(stage, manifest)
    except BaseException:
        writer.abort()
        shutil.rmtree(stage, ignore_errors=True)
        raise
    commit_staged(stage, out, manifest)
    return manifest


def _manifest(cfg, class_names, rule: str, shards: dict, writer: _Writer) -> dict:
    d = cfg.data
    summary = {s: {"tiles": int(writer.counts[i].sum()),
                   "per_class": dict(zip(class_names, writer.counts[i].tolist()))} for i, s in enumerate(SPLITS)}
    return {
        "format_version": FORMAT_VERSION, "task": "classification", "class_names": list(class_names),
        "bands": int(writer.shape[0]), "tile_px": d.tile_px, "pixel_size_m": d.pixel_size_m,
        "source": d.class_folder or "synthetic stand types",
        "split_rule": {"rule": rule, "fractions": d.split_fractions, "seed": cfg.run.seed},
        "splits": {s: {"shards": shards[s], "samples": summary[s]["tiles"]} for s in SPLITS},
        "summary": summary, "normalization": writer.stats.summary(),
    }


def print_class_summary(manifest: dict, out) -> int:
    """Tiles per class and split, and the band statistics: what to know before training. Returns 0."""
    names, summary = manifest["class_names"], manifest["summary"]
    width = max(len(n) for n in names + ["class"])
    print(f"\ndataset: {out}  ({len(names)} classes, {manifest['bands']} band(s), split "
          f"{manifest['split_rule']['rule']})")
    print(f"{'class':{width}} " + " ".join(f"{s:>6}" for s in SPLITS))
    for name in names:
        print(f"{name:{width}} " + " ".join(f"{summary[s]['per_class'][name]:6d}" for s in SPLITS))
    norm = manifest["normalization"]
    print("band mean/std (train): " + ", ".join(f"{m:.3g}/{s:.3g}" for m, s in zip(norm["mean"], norm["std"])))
    return 0
