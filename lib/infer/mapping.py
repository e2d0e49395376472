"""Map gaps on scenes end to end: one scene (resampled to the model's pixel size when it differs), and many
scenes in one resumable run, split across torchrun processes.

A scene's folder gets gaps_{tag}.tif (Cloud-Optimized GeoTIFFs) and .csv, gaps.gpkg (one layer per
threshold), prob_{tag}.tif (optional), quicklook.png, predict.json, and with a reference ref_gaps_{tag}.tif and scores.json; every file is written atomically. In a region run each
scene gets <out>/<stem>/ and done.json is written there last: a scene whose done.json holds the same
settings and whose outputs all exist is skipped, so an interrupted run resumes where it stopped. A scene
that fails (unreadable file, every pixel nodata, ...) gets failed.json with the error instead, and the run
goes on with the next one. Rank r of N maps scenes r, r + N, ...; after a barrier rank 0 writes
gaps_all_{tag}.csv (the finished scenes' gaps with a scene column) and predict.json (they and the failures).
"""
import contextlib
import csv
import io
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from lib.core.atomic import write_text
from lib.core.config import config_to_dict
from lib.core.errors import DataError, RasterError
from lib.core.atomic import write_json
from lib.gaps.masks import IGNORE, threshold_tag
from lib.geoio.georef import check_same_grid
from lib.geoio.geotiff_read import iter_strips, read_info
from lib.geoio.geotiff_write import RasterWriter
from lib.geoio.resample import dsm_methods, needs_resampling, resample_raster, resampled_grid
from lib.geoio.cog import to_cog
from lib.geoio.geopackage import GpkgWriter
from lib.infer.scene_gaps import filter_maps, write_quicklook
from lib.infer.scene_windows import WrittenScene, gpu_batch_size, plan_scene, write_scene
from lib.infer.scene_scores import score_scene

log = logging.getLogger(__name__)
DONE = "done.json"
FAILED = "failed.json"
FILL_VALUES = np.array([0, 9999, -9999, -32767, -32768, -3.4028235e38, 3.4028235e38], np.float32)
TEMPORARY_DIRS = (".model_grid.", ".dsm_nodata.")  # in a scene's folder while it is mapped
FILL_GAP_M = 50.0  # a fill value this far beyond every height is no surface (0 around a DSM at 400 m a.s.l.)
DSM_SUFFIXES = (".tif", ".tiff")
BARRIER_TIMEOUT = timedelta(days=7)  # ranks wait for the slowest one's scenes, however long they take


@dataclass
class MapSettings:
    """How every scene is mapped: the model, what it was trained on, and the resolved config."""

    net: torch.nn.Module
    cfg: object                    # lib.core.schema.Config: predict, data (area filter), eval (classical window)
    thresholds_m: list[float]
    pixel_size_m: float            # the model's training pixel size, metres
    stride: int = 1
    device: object = "cpu"
    checkpoint: str = ""
    model_sha256: str = ""         # of the checkpoint file: a retrained model at the same path is another model
    resample: bool = True          # resample other pixel sizes (else refuse them)
    filter: bool = True            # area filter + gap table
    quicklook: bool = True

    def fingerprint(self) -> dict:
        """What decides a scene's outputs: a finished scene is reused only when this is unchanged."""
        p = self.cfg.predict
        return {"checkpoint": self.checkpoint, "model_sha256": self.model_sha256,
                "thresholds_m": list(self.thresholds_m), "window_px": p.window_px, "overlap": p.overlap,
                "tta": p.tta, "prob_threshold": p.prob_threshold, "nested": p.nested, "write_prob": p.write_prob,
                "min_area_m2": self.cfg.data.min_area_m2, "max_area_m2": self.cfg.data.max_area_m2,
                "resample": self.resample, "filter": self.filter, "quicklook": self.quicklook}

    def outputs(self) -> list[str]:
        """File names a finished scene has (without a reference)."""
        tags = [threshold_tag(t) for t in self.thresholds_m]
        return (["predict.json"] + [f"gaps_{t}.tif" for t in tags] + [f"gaps_{t}.csv" for t in tags if self.filter]
                + [f"prob_{t}.tif" for t in tags if self.cfg.predict.write_prob] + (["gaps.gpkg"] if self.filter else [])
                + (["quicklook.png"] if self.quicklook else []))


def _predict(s: MapSettings, dsm_path, out_dir: Path, grid, progress, compress: bool = True, raw_dir=None):
    """The strip pass on a DSM already on the model's grid (gap maps into raw_dir for the area filter)."""
    p = s.cfg.predict
    plan = plan_scene(grid.height, grid.width, p.window_px, p.overlap, s.stride)
    batch = p.batch_size if p.compile else gpu_batch_size(s.net, p.window_px, s.thresholds_m, s.device, p.batch_size)
    return write_scene(s.net, dsm_path, out_dir, plan, s.thresholds_m, batch, p.tta, s.device, p.write_prob,
                       p.prob_threshold, pad_batches=p.compile, nested=p.nested,
                       progress=progress(grid.height, grid.width) if progress else None, compress=compress,
                       raw_dir=raw_dir)


def _predict_resampled(s: MapSettings, dsm_path: Path, info, out_dir: Path, progress, work: Path) -> WrittenScene:
    """Resample the DSM to the model's pixel size, predict there, and bring the maps back to the input grid:
    nearest for the gap maps (into work, for the area filter; COGs without it), bilinear for probabilities
    (COGs); the input's nodata stays nodata."""
    grid = resampled_grid(info, s.pixel_size_m)
    resample_raster(dsm_path, work / "dsm.tif", grid, dsm_methods(info, s.pixel_size_m), compress=False)
    written = _predict(s, work / "dsm.tif", work, grid, progress, compress=False)
    paths = {}
    for tag, path in written.paths.items():
        paths[tag] = (work / f"input_grid_{tag}.tif") if s.filter else out_dir / path.name
        resample_raster(path, paths[tag], info, "nearest", np.uint8, IGNORE, nodata_like=dsm_path, compress=False)
        if not s.filter:
            to_cog(paths[tag], np.uint8, IGNORE)
        if s.cfg.predict.write_prob:
            resample_raster(work / f"prob_{tag}.tif", out_dir / f"prob_{tag}.tif", info, "bilinear",
                            nodata_like=dsm_path, compress=False)
            to_cog(out_dir / f"prob_{tag}.tif", np.float32, float("nan"))
    return WrittenScene(paths, written.nesting)


def scan_dsm(dsm_path, info) -> list[float]:
    """One pass over the DSM: RasterError when no pixel holds a height; else the undeclared fill values, i.e.
    common ones (FILL_VALUES) lying FILL_GAP_M or more beyond every other height (a survey outline written as 0)."""
    counts, low, high = {}, np.inf, -np.inf
    for _, block in iter_strips(dsm_path, 256):
        values = block[np.isfinite(block)]
        fill = np.isin(values, FILL_VALUES)
        for value, n in zip(*np.unique(values[fill], return_counts=True)):
            counts[float(value)] = counts.get(float(value), 0) + int(n)
        if fill.sum() < values.size:
            low, high = min(low, float(values[~fill].min())), max(high, float(values[~fill].max()))
    fills = sorted(v for v in counts if not low - FILL_GAP_M < v < high + FILL_GAP_M)
    if low > high and len(fills) == len(counts):
        raise RasterError(f"{dsm_path}: every pixel of the {info.height}x{info.width} DSM is nodata (nodata value "
                          f"{info.nodata}{', fill values ' + str(fills) if fills else ''})",
                          hint="check the file and its nodata value (GDAL_NODATA tag; gdalinfo -stats shows both)")
    for value in fills:
        log.warning("WARNING: %s: %d pixels hold %g, %g m or more beyond every other height and not declared nodata: "
                    "treated as nodata (declare it in the file: gdal_edit.py -a_nodata %g)", dsm_path, counts[value],
                    value, FILL_GAP_M, value)
    return fills


def mask_values(dsm_path, info, values, out_path) -> Path:
    """Copy of the DSM (uncompressed, for a temporary folder) with `values` as NaN; streamed strip by strip."""
    with RasterWriter(out_path, info, np.float32, float("nan"), compress=False) as out:
        for row0, block in iter_strips(dsm_path, 256):
            block[np.isin(block, np.asarray(values, np.float32))] = np.nan
            out.write(row0, block)
    return Path(out_path)


def warn_small_scene(s: MapSettings, dsm_path, grid) -> None:
    """Warn when the scene, on the model's grid, is narrower than one window: the model then sees mostly padding."""
    window = s.cfg.predict.window_px
    if min(grid.height, grid.width) < window:
        log.warning("WARNING: %s is %d x %d px on the model's %g m grid, smaller than its %d px window: the model "
                    "and its ground estimate see no terrain beyond the scene, so the maps are much less reliable "
                    "(map a larger extent and crop the maps)", dsm_path, grid.height, grid.width, s.pixel_size_m,
                    window)


def map_scene(s: MapSettings, dsm_path, out_dir, chm_path=None, dtm_path=None, progress=None, echo=None) -> dict:
    """Map one scene into out_dir; returns its summary, also written as predict.json (scores.json with a reference).

    progress(height, width) -> callable(rows_done), for the strip pass; echo(line) prints results. Undeclared
    fill values (scan_dsm) are made nodata in a temporary copy of the DSM that every step reads instead.
    """
    dsm_path, out_dir = Path(dsm_path), Path(out_dir)
    info = read_info(dsm_path)
    fills = scan_dsm(dsm_path, info)
    reference = chm_path or dtm_path
    if reference:
        check_same_grid({str(dsm_path): info, str(reference): read_info(reference)})
    resampled = needs_resampling(info, s.pixel_size_m)
    if resampled and not s.resample:
        raise RasterError(f"{dsm_path} has {info.pixel_size[0]:g} x {info.pixel_size[1]:g} m pixels but the model "
                          f"({s.checkpoint}) was trained on {s.pixel_size_m:g} m pixels (more than 1 % apart)",
                          hint="leave out --no-resample to resample it to the model's pixels and back")
    warn_small_scene(s, dsm_path, resampled_grid(info, s.pixel_size_m) if resampled else info)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = tempfile.TemporaryDirectory(dir=out_dir, prefix=TEMPORARY_DIRS[1]) if fills else contextlib.nullcontext()
    with work_dir as work:
        source = mask_values(dsm_path, info, fills, Path(work) / "dsm.tif") if fills else dsm_path
        summary = _map_scene(s, source, info, out_dir, chm_path, dtm_path, progress, echo or (lambda line: None))
    summary.update(dsm=str(dsm_path), undeclared_nodata=fills)
    write_json(out_dir / "predict.json", summary)
    return summary


def _map_scene(s: MapSettings, dsm_path: Path, info, out_dir: Path, chm_path, dtm_path, progress, echo) -> dict:
    """map_scene's work on a checked DSM: the maps, the area filter, table and polygons, quick-look, scores."""
    resampled = needs_resampling(info, s.pixel_size_m)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=TEMPORARY_DIRS[0]) as work:
        work = Path(work)
        raw_dir = work if s.filter else None
        written = (_predict_resampled(s, dsm_path, info, out_dir, progress, work) if resampled
                   else _predict(s, dsm_path, out_dir, info, progress, raw_dir=raw_dir))
        predicted = time.perf_counter() - start
        counts = _filter(s, written, dsm_path, info, out_dir, echo) if s.filter else {}
    paths = [out_dir / f"gaps_{threshold_tag(t)}.tif" for t in s.thresholds_m]
    if s.quicklook:
        write_quicklook(out_dir / "quicklook.png", dsm_path, paths, s.thresholds_m)
    seconds = time.perf_counter() - start
    if chm_path or dtm_path:
        scores = score_scene(out_dir, dsm_path, s.thresholds_m, s.cfg.data.min_area_m2, s.cfg.data.max_area_m2,
                             chm_path=chm_path, dtm_path=dtm_path, classical_window_m=s.cfg.eval.classical_window_m)
        write_json(out_dir / "scores.json", scores)
        echo_scores(scores, echo)
    megapixels = info.height * info.width / 1e6
    echo(f"scene: {megapixels:.2f} MP in {seconds:.1f} s ({megapixels / seconds:.3f} MP/s; model pass {predicted:.1f} s)"
         + "".join(f"; {n} gaps at {tag}" for tag, n in counts.items()))
    return {"checkpoint": s.checkpoint, "dsm": str(dsm_path), "thresholds_m": list(s.thresholds_m),
            "predict": config_to_dict(s.cfg.predict), "device": str(s.device),
            "pixel_size_m": {"input": list(info.pixel_size), "model": s.pixel_size_m, "resampled": resampled},
            "seconds": round(seconds, 3), "seconds_model_pass": round(predicted, 3), "megapixels": round(megapixels, 3),
            "megapixels_per_s": round(megapixels / seconds, 3),
            "nesting": {"nested": s.cfg.predict.nested, "before_nesting": written.nesting}, "gaps": counts}


def _filter(s: MapSettings, written, dsm_path: Path, info, out_dir: Path, echo) -> dict:
    """Area filter of each raw map into out_dir's gaps_{tag}.tif (COG) and .csv, polygons into gaps.gpkg;
    all maps in one pass over the DSM."""
    crs_name = (info.geo_ascii or "").split("|")[0] or None         # GeoTIFF citation: "name|datum|"
    maps = [(out_dir / f"gaps_{tag}.tif", raw, f"gaps_{tag}") for tag, raw in written.paths.items()]
    with GpkgWriter(out_dir / "gaps.gpkg", info.epsg, crs_name) as gpkg:
        for _, _, layer in maps:
            gpkg.layer(layer)
        counts = dict(zip(written.paths, filter_maps(maps, dsm_path, s.cfg.data.min_area_m2, s.cfg.data.max_area_m2,
                                                     gpkg)))
    for tag, (path, _, layer) in zip(counts, maps):
        echo(f"{tag:>6}: {counts[tag]:6d} gaps  -> {path}, {path.with_suffix('.csv').name}, gaps.gpkg layer {layer}")
    return counts


def echo_scores(scores: dict, echo) -> None:
    """Per threshold: IoU against the reference (and the DSM-only methods'), gap counts, λ and R side by side."""
    for tag, model in scores["model"].items():
        line = (f"{tag:>6}: IoU {model['iou']:.4f}  F1 {model['f1']:.4f}  (ground filter IoU "
                f"{scores['ground_filter'][tag]['iou']:.4f}, opening {scores['classical'][tag]['iou']:.4f})")
        stats = scores["gap_statistics"].get(tag)
        if stats:
            m, r = stats["model"], stats["reference"]
            line += (f"  gaps {m['n_gaps']} / ref {r['n_gaps']}  lambda_asner {m['lambda_asner']:.3f} / "
                     f"{r['lambda_asner']:.3f}  Clark-Evans R {m['clark_evans_r']:.3f} / {r['clark_evans_r']:.3f}")
        echo(line)


# ----------------------------------------------------------------------------- many scenes
def list_scenes(dsm=None, dsm_list=None) -> list[Path]:
    """The DSMs of a region run: every .tif/.tiff in the folder `dsm`, sorted, or the paths in the text file
    `dsm_list` (one per line, relative to the list's folder; blank lines and # comments skipped)."""
    if dsm_list is not None:
        dsm_list = Path(dsm_list)
        if not dsm_list.is_file():
            raise DataError(f"--dsm-list {dsm_list}: no such file")
        lines = [line.strip() for line in dsm_list.read_text(encoding="utf-8").splitlines()]
        paths = [dsm_list.parent / line for line in lines if line and not line.startswith("#")]
    else:
        paths = sorted(p for p in Path(dsm).iterdir() if p.suffix.lower() in DSM_SUFFIXES and p.is_file())
        others = [p for p in paths if p.stem.lower().endswith(("_chm", "_dtm"))]
        if others:  # a folder laid out as prepare_data's sites: its CHMs and DTMs are no DSMs to map
            log.warning("WARNING: %s: %d file(s) named *_CHM / *_DTM not mapped as DSMs: %s", dsm, len(others),
                        ", ".join(p.name for p in others[:5]) + (", ..." if len(others) > 5 else ""))
            paths = [p for p in paths if p not in others]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or not paths:
        raise DataError(f"{dsm_list or dsm}: " + (f"DSMs not found: {missing[:5]}" if missing else
                                                  f"no DSM GeoTIFFs (expected {', '.join(DSM_SUFFIXES)} files)"))
    return paths


def scene_names(paths) -> dict[str, Path]:
    """{file stem: path}: each scene's output folder name; two DSMs with one stem would share a folder."""
    names = {}
    for path in paths:
        if path.stem in names:
            raise DataError(f"scenes {names[path.stem]} and {path} have the same name {path.stem!r}: "
                            "their outputs would share one folder", hint="rename one of them")
        names[path.stem] = Path(path)
    return names


def is_finished(folder: Path, s: MapSettings) -> bool:
    """done.json is present, holds these settings, and every output it lists exists."""
    try:
        done = json.loads((folder / DONE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return done.get("settings") == s.fingerprint() and all((folder / name).is_file() for name in done["outputs"])


def _barrier() -> None:
    """Wait for every rank (no-op alone); gloo's monitored barrier takes a timeout longer than any scene."""
    import torch.distributed as dist

    from lib.train.distributed import is_distributed
    if is_distributed():
        dist.monitored_barrier(timeout=BARRIER_TIMEOUT, wait_all_ranks=True)


def map_region(s: MapSettings, paths, out_root, rank: int = 0, world: int = 1, progress=None, echo=None) -> dict:
    """Map the scenes r, r + N, ... of `paths` not finished before, each into out_root/<stem>/; then rank 0
    writes gaps_all_{tag}.csv and predict.json (all scenes). Returns {name: "mapped" | "skipped" | "failed"}
    for this rank: a scene that fails does not stop the others (its error is in <stem>/failed.json)."""
    out_root, echo = Path(out_root), echo or (lambda line: None)
    names = scene_names(paths)
    status = {}
    for i, (name, dsm_path) in enumerate(names.items()):
        if i % world != rank:
            continue
        folder = out_root / name
        if is_finished(folder, s):
            echo(f"{name}: finished before, skipped")
            status[name] = "skipped"
            continue
        echo(f"{name}: mapping {dsm_path}")
        status[name] = _map_region_scene(s, name, dsm_path, folder, progress, echo)
    _barrier()
    if rank == 0:
        write_region_summary(s, names, out_root, world)
    return status


def _map_region_scene(s: MapSettings, name: str, dsm_path: Path, folder: Path, progress, echo) -> str:
    """One scene of a region: "mapped" with done.json written last, or "failed" with failed.json (the error)."""
    for marker in (DONE, FAILED):                 # a stale marker must not vouch for half-rewritten outputs
        (folder / marker).unlink(missing_ok=True)
    _remove_leftovers(folder)
    try:
        summary = map_scene(s, dsm_path, folder, progress=progress, echo=lambda line: echo(f"{name} {line}"))
    except Exception as exc:  # any one file's problem (unreadable, all nodata, out of memory) spares the others
        error = f"{type(exc).__name__}: {exc}"
        echo(f"{name}: FAILED, going on with the other scenes: {error}")
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / FAILED, {"scene": name, "dsm": str(dsm_path), "error": error})
        return "failed"
    write_json(folder / DONE, {"scene": name, "dsm": str(dsm_path), "settings": s.fingerprint(),
                               "outputs": s.outputs(), "summary": summary})          # last: marks it finished
    return "mapped"


def _remove_leftovers(folder: Path) -> None:
    """Temporary files and folders of a run killed while mapping this scene (the folder is this rank's alone)."""
    for path in folder.glob(".*"):
        if path.is_dir() and path.name.startswith(TEMPORARY_DIRS):
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file() and path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)


def _failure(folder: Path) -> str:
    """Why a scene of a region is not finished: its failed.json's error, or no marker at all."""
    try:
        return json.loads((folder / FAILED).read_text(encoding="utf-8"))["error"]
    except (OSError, json.JSONDecodeError, KeyError):
        return f"no {DONE} (interrupted?)"


def write_region_summary(s: MapSettings, names: dict, out_root: Path, world: int) -> None:
    """gaps_all_{tag}.csv (a scene column, then each finished scene's gap table) and predict.json over all
    scenes: the finished ones' summaries and the others' errors."""
    finished = [name for name in names if is_finished(out_root / name, s)]
    failed = {name: _failure(out_root / name) for name in names if name not in finished}
    tables = {}
    for tag in (threshold_tag(t) for t in s.thresholds_m) if s.filter else ():
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        for i, name in enumerate(finished):
            with open(out_root / name / f"gaps_{tag}.csv", newline="", encoding="utf-8") as f:
                rows = list(csv.reader(f))
            writer.writerows(([["scene", *rows[0]]] if i == 0 else []) + [[name, *row] for row in rows[1:]])
        tables[tag] = out_root / f"gaps_all_{tag}.csv"
        write_text(tables[tag], text.getvalue())
    scenes = {name: json.loads((out_root / name / DONE).read_text(encoding="utf-8"))["summary"] for name in finished}
    write_json(out_root / "predict.json", {"settings": s.fingerprint(), "world_size": world,
                                           "tables": {tag: p.name for tag, p in tables.items()}, "scenes": scenes,
                                           "failed": failed})
