"""Benchmarks: data pipeline and training-step speed, as figures (JSON and a table), never as tests.

``python -m spatialvae bench`` measures, on whatever machine it runs:

- data: the one-time preprocessing rate for Kaggle-size JPEGs (shared images upscaled to
  1500x1200, all cores), the cache-file load time, and one epoch of batches from the cache
  against decoding every epoch;
- model: one training step (forward, loss, backward, AdamW step) at 128 px, batch 32, with and
  without the perceptual term (RANDOM VGG16 weights: the cost of ImageNet weights, no download),
  for eager fp32 NCHW, ``channels_last``, ``torch.compile`` and both, plus fp16/bf16 autocast on
  CUDA. Each setting runs in its own process (clean peak memory, no shared compile cache) on the
  same seeded weights and batch; its losses over the same sequence of updates must match eager's
  (1e-3 relative; 5e-2 under autocast) to count as *safe*. Speeds are ratios to eager from the
  same run;
- FLOPs per image (`torch.utils.flop_counter`) and a projection of the recipe's 150-epoch
  schedule onto a Kaggle T4 from them.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import cv2
import torch

from .. import data as D
from ..config import Config, DataConfig, get_preset
from ..engine import StepTools, autocast_context, default_device, noise_generator, train_step
from ..errors import SpatialVAEError, short_reason
from ..losses import build_loss
from ..model import build_model, count_parameters
from ..runs import RunDir, read_history_csv
from ..training import final_beta

# The models of bench's FLOP table (README, Benchmarks): the recipe, the CPU main job and the baseline.
FLOP_TABLE = (("seed", 128), ("quick", 64), ("original", 128))

# Kaggle's T4 (NVIDIA datasheet): 65 TFLOP/s fp16 tensor cores, 8.1 TFLOP/s fp32.
T4_FP16_TFLOPS = 65.0
T4_FP32_TFLOPS = 8.1
# Utilisation assumed for the projection: small 128 px convs, GroupNorm and attention are partly
# memory-bound, so a mixed-precision conv net of this size reaches a fraction of the tensor peak.
T4_UTILISATION = (0.15, 0.30)
# Kaggle's 5,216 train + 16 val images, split 90/10 by patient (what `data` reports): 4,694 / 522.
KAGGLE_TRAIN_IMAGES, KAGGLE_VAL_IMAGES = 4694, 522


@dataclass(frozen=True)
class StepSetting:
    name: str
    channels_last: bool = False
    compile: bool = False
    amp: Optional[str] = None  # None (fp32) | "fp16" | "bf16": CUDA autocast


CPU_SETTINGS = (StepSetting("eager"), StepSetting("channels_last", channels_last=True),
                StepSetting("compile", compile=True), StepSetting("compile+channels_last", True, True))
CUDA_EXTRA = (StepSetting("fp16", amp="fp16"), StepSetting("bf16", amp="bf16"),
              StepSetting("fp16+channels_last", channels_last=True, amp="fp16"),
              StepSetting("bf16+channels_last", channels_last=True, amp="bf16"))


# ---- one training-step measurement (runs in a child process) ---------------------------------

def _rss_mb() -> float:
    """This process's resident memory now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


class _PeakRss:
    """Polls the resident memory every 2 ms in a thread: the peak *during* the block, which the
    process-wide ru_maxrss cannot give (it keeps whatever peak importing torch reached)."""

    def __enter__(self):

        self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _step_config(preset: str, image_size: int, perceptual: bool) -> Config:
    """The preset at ``image_size``; the perceptual term on (RANDOM VGG16 weights: the cost of the
    ImageNet ones, no download) or off."""
    cfg = get_preset(preset).with_overrides({"data.image_size": image_size})
    if not perceptual:
        cfg.loss.perceptual_weight = 0.0
    elif cfg.loss.perceptual_weight == 0:  # presets that switch it off (smoke) get the recipe's 0.1
        cfg.loss.perceptual_weight = 0.1
    cfg.loss.vgg_weights = "random"
    return cfg


def _training_step(cfg: Config, s: StepSetting, dev: torch.device, batch: int, seed: int):
    """The trainer's own step (engine.train_step) with the preset's lr, weight decay, clip and final
    beta, sampling the posterior, on one seeded batch: what is timed is what trains -> step()."""
    torch.manual_seed(seed)
    model = build_model(cfg).to(dev)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "RANDOM VGG16" is stated in the table instead
        loss_fn = build_loss(cfg).to(dev)
    size = cfg.data.image_size
    memory_format = torch.channels_last if s.channels_last else torch.contiguous_format
    x = torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(seed + 1)).to(dev)
    x = x.contiguous(memory_format=memory_format)
    model = model.to(memory_format=memory_format)
    if s.compile:  # compiled code draws the posterior noise with eager's generator, so losses compare
        import torch._inductor.config as inductor_config  # loads the compiler: only for compile settings

        inductor_config.fallback_random = True
    step_model = torch.compile(model) if s.compile else model
    t = cfg.train
    first = t.phase1 if t.phase1.epochs > 0 else t.phase2
    opt = torch.optim.AdamW(model.parameters(), lr=first.lr, weight_decay=t.weight_decay)
    amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(s.amp or "")
    if amp is not None and dev.type != "cuda":
        raise SpatialVAEError(f"{s.name}: autocast settings are measured on CUDA only")
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    beta = final_beta(t)
    tools = StepTools(opt, scaler, list(model.parameters()), t.grad_clip, autocast=lambda: autocast_context(dev, amp),
                      noise=noise_generator(seed, 0, dev))

    def step() -> float:
        res = train_step(step_model, loss_fn, x, beta, tools)
        return float(res.total)
    return step


def measure_step(preset: str, image_size: int, batch: int, perceptual: bool, setting: dict, repeats: int,
                 device: str = "auto", seed: int = 0) -> dict:
    """Time ``repeats`` training steps after warm-up; returns images/s, first loss, peak memory."""
    s = StepSetting(**setting)
    rss_before = _rss_mb()  # the interpreter + torch, before any model exists
    dev = default_device(device)
    step = _training_step(_step_config(preset, image_size, perceptual), s, dev, batch, seed)
    sync = _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    sync()
    t0 = time.perf_counter()
    first_loss = step()  # the warm-up (and the compile, when compiling)
    sync()
    warmup = time.perf_counter() - t0
    step()  # every setting makes the same number of updates; compiled code may finish compiling here
    times, last_loss, finite, rss_peak = _timed_steps(step, repeats, sync)
    peak_mb = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else rss_peak - rss_before
    med = statistics.median(times)
    # The safety check compares the loss after repeats + 2 identical updates with eager's: the first
    # loss alone can match bit for bit (a near-constant decoder output at initialisation).
    return {"setting": s.name, "perceptual": perceptual, "first_loss": first_loss, "last_loss": last_loss,
            "finite": finite,
            "warmup_seconds": round(warmup, 3), "step_seconds": [round(t, 4) for t in times],
            "median_step_seconds": round(med, 4), "images_per_s": round(batch / med, 2),
            "peak_memory_mb": round(peak_mb, 1),
            "peak_memory_kind": ("CUDA max allocated" if dev.type == "cuda"
                                 else "peak resident memory during the timed steps minus that after importing torch"),
            "device": str(dev), "threads": torch.get_num_threads()}


def _timed_steps(step, repeats: int, sync) -> tuple[list, float, bool, float]:
    """Run ``repeats`` steps, each timed between device syncs -> (seconds, last loss, all finite,
    peak resident MB). Steady-state steps only: compile-time memory is not a training cost."""

    times, finite, last_loss = [], True, math.nan
    with _PeakRss() as rss:
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            last_loss = step()
            sync()
            times.append(time.perf_counter() - t0)
            finite &= math.isfinite(last_loss)
    return times, last_loss, finite, rss.peak


def _sync(dev: torch.device):
    return torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)


def _run_in_child(args: dict, timeout: float) -> dict:
    """measure_step in a fresh interpreter; errors come back as {"error": reason}."""
    cmd = [sys.executable, "-m", "spatialvae.lab.bench", json.dumps(args)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail[:300]}
    return json.loads(lines[-1])


# ---- FLOPs and the T4 projection -------------------------------------------------------------------

def count_flops(preset: str = "seed", image_size: int = 128) -> dict:
    """FLOPs per image (convs, matmuls, attention; not norms/activations), batch of 2 divided by 2."""

    from torch.utils.flop_counter import FlopCounterMode  # only for this count; absent from older torch builds


    cfg = get_preset(preset).with_overrides({"data.image_size": image_size})
    torch.manual_seed(0)
    model = build_model(cfg)
    x = torch.rand(2, 1, image_size, image_size)

    def flops(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 2

    def step(loss_fn):
        recon, mu, logvar = model(x)
        return loss_fn(recon, x, mu, logvar, 1e-3)[0]

    plain = build_loss(cfg.with_overrides({"loss.perceptual_weight": 0.0}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vgg = build_loss(cfg.with_overrides({"loss.perceptual_weight": 0.1, "loss.vgg_weights": "random"}))

    return {
        "preset": preset, "image_size": image_size, "parameters": count_parameters(model),
        "latent_shape": list(model.latent_shape),
        "model_forward": flops(lambda: model(x)),
        "model_forward_backward": flops(lambda: step(plain).backward()),
        "with_perceptual_forward_backward": flops(lambda: step(vgg).backward()),
        "with_perceptual_forward": flops(lambda: step(vgg)),
    }


def t4_projection(flops: dict, train_images: int = KAGGLE_TRAIN_IMAGES, val_images: int = KAGGLE_VAL_IMAGES,
                  epochs: int = 150) -> dict:
    """Hours for the recipe's schedule on one T4 at the assumed utilisations of its fp16 peak.
    FLOPs only: data loading, host syncs and memory-bound layers make this a lower bound."""
    per_epoch = (train_images * flops["with_perceptual_forward_backward"]
                 + val_images * flops["with_perceptual_forward"])
    total = per_epoch * epochs
    hours = {f"{int(u * 100)}% of fp16 peak": round(total / (T4_FP16_TFLOPS * 1e12 * u) / 3600, 2)
             for u in T4_UTILISATION}
    hours["100% of fp32 peak (no AMP)"] = round(total / (T4_FP32_TFLOPS * 1e12) / 3600, 2)
    return {"total_pflop": round(total / 1e15, 2), "epochs": epochs, "train_images": train_images,
            "val_images": val_images, "hours": hours,
            "note": "FLOP-based; the recipe's own estimate is 3-6 GPU hours"}


# ---- data ------------------------------------------------------------------------------------------

def _full_size_decode(args):
    """A full-resolution cv2 decode, then the same CLAHE + resize: what per-epoch code usually does
    (a `data.load_split` decode hook; module-level so worker processes can run it)."""
    cv2.setNumThreads(1)
    path, size, clip, tiles = args
    gray = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    return D.preprocess(gray, size, clip, tiles), (gray.shape[1], gray.shape[0]), "L", None


def _kaggle_size_copies(train: list, n: int, folder: str) -> list:
    """``n`` training images re-encoded at Kaggle's original size (~1500x1200 grayscale JPEGs)."""
    entries = []
    for i, e in enumerate(train[:n]):
        big = cv2.resize(cv2.imread(e.path, cv2.IMREAD_GRAYSCALE), (1500, 1200), interpolation=cv2.INTER_CUBIC)
        path = os.path.join(folder, f"IM-{i:04d}-0001.jpeg")
        cv2.imwrite(path, big, [cv2.IMWRITE_JPEG_QUALITY, 95])
        entries.append(D.FileEntry(path, e.label, f"IM-{i:04d}"))
    return entries


def _preprocess_rates(entries: list, image_size: int, cores: int) -> dict:
    """Images/s of the one-time preprocessing: all cores, one core, and a naive full-size decode."""
    def rate(n_workers: int, decode=None) -> float:
        t0 = time.perf_counter()
        D.load_split(entries, image_size, workers=n_workers, use_cache=False, progress=False, decode=decode)
        return round(len(entries) / (time.perf_counter() - t0), 1)

    return {"images": len(entries), "images_per_s": rate(cores), "processes": cores,
            "images_per_s_one_process": rate(1), "images_per_s_full_size_decode": rate(cores, _full_size_decode)}


def _cached_epochs(ds, batch: int) -> dict:
    """Median seconds of one epoch of batches from the in-memory cache, 0 and 2 loader workers."""
    out = {}
    for loader_workers in (0, 2):
        loader = D.make_dataloader(ds, batch, train=True, num_workers=loader_workers)
        times = []
        for epoch in range(3):
            ds.set_epoch(epoch)
            t0 = time.perf_counter()
            n = sum(int(xb.shape[0]) for xb, _ in loader)
            times.append(time.perf_counter() - t0)
        key = "cached_epoch" if loader_workers == 0 else "cached_epoch_2_workers"
        out[key] = {"images": n, "seconds": round(statistics.median(times), 4), "batch": batch}
    return out


def bench_data(data_root, image_size: int = 128, kaggle_n: int = 200, batch: int = 32,
               workers: Optional[int] = None) -> dict:
    """Preprocessing rate (Kaggle-size; all cores, one core, naive full-size decode), cache load,
    cached epoch (0 and 2 loader workers) vs decoding every epoch."""
    cores = workers or D.default_workers()
    plan = D.plan_splits(data_root)
    if not plan.files["train"]:
        raise SpatialVAEError(f"no training images under {plan.root}")
    res: dict = {"cores": cores, "image_size": image_size}
    with tempfile.TemporaryDirectory() as tmp:
        entries = _kaggle_size_copies(plan.files["train"], kaggle_n, tmp)
        res["kaggle_size_preprocess"] = k = _preprocess_rates(entries, image_size, cores)
        cfg = DataConfig(root=str(plan.root), image_size=image_size, cache_dir=str(Path(tmp) / "cache"))
        D.ChestXRayDataset("train", cfg, plan, progress=False)  # decodes and writes the cache
        D.clear_memo()  # the next load reads the file, not the in-process memo
        t0 = time.perf_counter()
        ds = D.ChestXRayDataset("train", cfg, plan, progress=False)
        res["cache_load_seconds"] = round(time.perf_counter() - t0, 3)
        res["cache_images"] = len(ds)
        res.update(_cached_epochs(ds, batch))
    res["decode_every_epoch_seconds"] = round(len(ds) / k["images_per_s"], 2)  # at the Kaggle-size rate above
    res["decode_vs_cached"] = round(len(ds) / k["images_per_s"] / max(res["cached_epoch"]["seconds"], 1e-9), 1)
    return res


# ---- the whole benchmark -------------------------------------------------------------------------

def run_bench(data_root=None, preset: str = "seed", image_size: int = 128, batch: int = 32, repeats: int = 3,
              settings: Optional[Sequence[str]] = None, perceptual: Sequence[bool] = (False, True),
              kaggle_n: int = 200, skip_data: bool = False, timeout: float = 900.0, progress: bool = True) -> dict:

    cuda = torch.cuda.is_available()
    all_settings = CPU_SETTINGS + (CUDA_EXTRA if cuda else ())
    chosen = [s for s in all_settings if settings is None or s.name in settings]
    unknown = sorted(set(settings or ()) - {s.name for s in all_settings})
    if unknown:
        raise SpatialVAEError(f"unknown setting(s) {', '.join(unknown)}: choose from "
                              f"{', '.join(s.name for s in all_settings)}")
    if chosen[0].name != "eager":
        chosen = [CPU_SETTINGS[0]] + [s for s in chosen if s.name != "eager"]  # ratios need the baseline
    out: dict = {"machine": machine(),
                 "step": {"preset": preset, "image_size": image_size, "batch": batch, "repeats": repeats,
                          "what": "forward + loss + backward + clip + AdamW step; perceptual = RANDOM VGG16"}}
    if not skip_data:
        _say(progress, "data: preprocessing Kaggle-size images, cache load, cached epoch ...")
        out["data"] = bench_data(data_root, image_size=image_size, kaggle_n=kaggle_n, batch=batch)
    _say(progress, "FLOPs ...")
    out["models"] = [count_flops(p, size) for p, size in FLOP_TABLE]
    out["flops"] = next((m for m in out["models"] if (m["preset"], m["image_size"]) == (preset, image_size)),
                        None) or count_flops(preset, image_size)  # the timed model's, counted once
    rows = []
    for perc in perceptual:
        base = None
        for s in chosen:
            _say(progress, f"step: {s.name}, perceptual {'on' if perc else 'off'} ...")
            r = _run_in_child({"preset": preset, "image_size": image_size, "batch": batch, "perceptual": perc,
                               "setting": asdict(s), "repeats": repeats}, timeout)
            r.setdefault("setting", s.name)
            r["perceptual"] = perc
            if s.name == "eager":
                base = r
            rows.append(_judge(r, base))
    out["steps"] = rows
    out["recommended"] = recommend(rows)
    if "data" in out:
        eager = next((r for r in rows if r["setting"] == "eager" and not r["perceptual"] and "error" not in r), None)
        if eager:
            d = out["data"]
            steps = d["cache_images"] // batch
            d["model_epoch_seconds"] = round(steps * eager["median_step_seconds"], 1)
            d["data_share_of_epoch"] = round(d["cached_epoch"]["seconds"] / max(d["model_epoch_seconds"], 1e-9), 5)
    out["t4_projection"] = t4_projection(out["flops"])
    return out


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _judge(r: dict, base: Optional[dict]) -> dict:
    """Add the ratio to eager and the safety verdict (finite, first loss within tolerance)."""
    if "error" in r or base is None or "error" in base:
        r.update({"speedup": None, "safe": False})
        return r
    r["speedup"] = round(r["images_per_s"] / base["images_per_s"], 3)
    tol = 5e-2 if "fp16" in r["setting"] or "bf16" in r["setting"] else 1e-3
    rel = max(abs(r[k] - base[k]) / max(abs(base[k]), 1e-12) for k in ("first_loss", "last_loss"))
    r["loss_rel_diff"] = rel
    r["safe"] = bool(r["finite"] and rel <= tol)
    return r


def recommend(rows: list[dict]) -> dict:
    """The fastest safe setting, per perceptual on/off (ties and slower ones keep eager)."""
    rec = {}
    for perc in sorted({r["perceptual"] for r in rows}):
        ok = [r for r in rows if r["perceptual"] == perc and "error" not in r
              and (r.get("safe") or r["setting"] == "eager")]
        if ok:
            best = max(ok, key=lambda r: r["images_per_s"])
            rec["perceptual_on" if perc else "perceptual_off"] = {"setting": best["setting"],
                                                                  "speedup": best.get("speedup")}
    return rec


# ---- time to quality -----------------------------------------------------------------------------

DEFAULT_THRESHOLDS = (27.1, 28.7)  # dB bars without a metrics.json: the 64 px bicubic map and PCA-1024


def time_to_quality(run_dirs: list, thresholds: Optional[tuple] = None) -> dict:
    """Curves and "minutes to reach X dB" from runs trained with ``train --monitor-test``.

    ``thresholds`` default: 20 and 24 dB, then the PCA floor and PCA + 1 / + 2 dB of the first run
    with a metrics.json (so the bars follow the resolution); without one, the fixed
    ``DEFAULT_THRESHOLDS`` (the 64 px bicubic map and PCA).

    The clock is the sum of each epoch's ``seconds`` (training + validation, not the monitor
    itself), so it is what the same run costs without watching. Only runs made on the same
    machine, one at a time, compare."""

    floors = _floors(run_dirs)
    if thresholds is None:
        pca = next((f["psnr_db"] for k, f in floors.items() if k.startswith("PCA")), None)
        thresholds = (20.0, 24.0) + (DEFAULT_THRESHOLDS if pca is None else tuple(round(pca + d, 2) for d in (0, 1, 2)))
    curves, table = {}, []
    for run in map(Path, run_dirs):
        path = RunDir(run).history
        if not path.is_file():
            raise SpatialVAEError(f"no history.csv in {run}: pass run folders made by `train`")
        rows = read_history_csv(path)
        if not rows or "monitor_psnr" not in rows[0]:
            raise SpatialVAEError(f"{run} was trained without --monitor-test, so it has no test curve; "
                                  "train it again with --monitor-test")
        minutes, total = [], 0.0
        for r in rows:
            total += float(r["seconds"]) / 60
            minutes.append(total)
        psnr = [float(r["monitor_psnr"]) for r in rows]
        ssim = [float(r["monitor_ssim"]) for r in rows]
        first2 = next((i for i, r in enumerate(rows) if int(r["phase"]) == 2), None)
        boundary = None if first2 is None else (minutes[first2 - 1] if first2 > 0 else 0.0)
        curves[run.name] = {"minutes": minutes, "psnr": psnr, "ssim": ssim, "boundary": boundary}
        reach = {f"{t:g}": next((round(m, 2) for m, p in zip(minutes, psnr) if p >= t), None) for t in thresholds}
        p1 = psnr[first2 - 1] if first2 else None
        table.append({"run": run.name, "epochs": len(rows), "minutes": round(minutes[-1], 2),
                      "final_psnr": psnr[-1], "best_psnr": max(psnr), "final_ssim": ssim[-1],
                      "end_of_phase1_psnr": p1, "minutes_to_db": reach})
    return {"curves": curves, "table": table, "floors": floors}


def _floors(run_dirs: list) -> dict:
    """PSNR / SSIM floors from the first run that has an `evaluate` metrics.json (same test split)."""
    for run in map(Path, run_dirs):
        path = RunDir(run).metrics
        if path.is_file():
            f = json.loads(path.read_text()).get("floors") or {}
            if "pca" in f:
                return {f"PCA, {f['pca']['components']} components": f["pca"],
                        "training mean image": f["mean_image"]}
    return {}


def machine() -> dict:
    """What the figures were measured on."""
    cuda = torch.cuda.is_available()
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "cuda": torch.cuda.get_device_name(0) if cuda else None}


if __name__ == "__main__":  # the child process of _run_in_child
    try:
        print(json.dumps(measure_step(**json.loads(sys.argv[1]))))
    except Exception as e:  # reported as this setting's "error", never a crash of the whole bench
        print(f"{type(e).__name__}: {short_reason(e)}", file=sys.stderr)
        sys.exit(1)
