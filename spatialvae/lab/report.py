"""Markdown tables of results (evaluate, ablation, bench, time to quality), through one number formatter.

Pure formatting of the dicts the measuring modules return (and write as JSON): nothing here
computes, so a table can be rebuilt from a saved metrics.json / ablation.json / bench.json.
"""

from __future__ import annotations

from typing import Optional

from ..config import Config, perceptual_mode
from ..data import CLASSES


def fmt(value, spec: str = "{:.4f}") -> str:
    """``value`` formatted with ``spec``, or "n/a" when it was not measured (None)."""
    return "n/a" if value is None else spec.format(value)


def _tstr_lines(tstr: Optional[dict]) -> list[str]:
    if not tstr:
        return []
    lines = ["", f"| TSTR: trained on {tstr['per_class']} images per class, tested on real test "
                 f"(mean of {tstr.get('repeats', 1)} classifier seeds) | accuracy | balanced accuracy (std) | x real |",
             "|---|---:|---:|---:|"]
    for name, r in tstr.items():
        if isinstance(r, dict) and "balanced_accuracy" in r:
            ratio = "1.00 (reference)" if name == "real" else fmt(r.get("ratio_to_real"), "{:.2f}")
            lines.append(f"| {name} | {fmt(r['accuracy'], '{:.3f}')} | {fmt(r['balanced_accuracy'], '{:.3f}')} "
                         f"({fmt(r.get('balanced_accuracy_std'), '{:.3f}')}) | {ratio} |")
    return lines


def _c2st_lines(c2st: Optional[dict]) -> list[str]:
    if not c2st:
        return []
    if "skipped" in c2st:
        return ["", f"C2ST not computed: {c2st['skipped']}"]
    ref = c2st["reference"]
    lines = ["", f"| C2ST vs {ref['n']} real images never trained on ({ref['source']}): a small CNN tells them "
                 "apart | held-out accuracy (0.5 = cannot) | std error | p vs 0.5 | ROC AUC (0.5 = cannot) | "
                 "log-loss | n held out |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in ("learned", "reconstructions"):
        r = c2st.get(name) or {}
        lines.append(f"| {name} | {fmt(r.get('accuracy'), '{:.3f}')} | {fmt(r.get('std_error'), '{:.3f}')} | "
                     f"{fmt(r.get('p_value'), '{:.2g}')} | {fmt(r.get('auc'), '{:.3f}')} | "
                     f"{fmt(r.get('log_loss'), '{:.3f}')} | {fmt(r.get('n_heldout'), '{}')} |")
    return lines


SHARPNESS_KEYS = ("power_0.25-0.5", "power_0.5-0.75", "power_0.75-1", "laplacian")


def _sharpness_row(label: str, ratios: Optional[dict]) -> str:
    r = ratios or {}
    return f"| {label} | " + " | ".join(fmt(r.get(k), "{:.3f}") for k in SHARPNESS_KEYS) + " |"


def _sharpness_lines(metrics: dict) -> list[str]:
    """The sharpness ratios of the evaluated decoder (and the smooth one beside a sharp one), each figure
    above the real-vs-real and blurred references it is read against."""
    sh = metrics.get("sharpness")
    if not sh:
        return []
    smooth = (metrics.get("smooth_decoder") or {}).get("sharpness")
    decoders = [(sh["decoder"], sh)] + ([("smooth", smooth)] if smooth else [])
    lines = ["", "| sharpness: fine detail over real (1 = as much as real) | power 0.25-0.5 Nyquist | 0.5-0.75 | "
                 "0.75-1 | Laplacian variance |", "|---|---:|---:|---:|---:|"]
    for name, d in decoders:
        lines.append(_sharpness_row(f"{name} decoder: test reconstructions / their originals", d.get("reconstructions")))
        if d.get("learned"):
            lines.append(_sharpness_row(f"{name} decoder: learned-prior samples / validation images", d["learned"]))
    lines.append(_sharpness_row("real: validation / test images (reference)", sh.get("reference_real")))
    for key in sorted(k for k in sh if k.startswith("blur_sigma_")):
        lines.append(_sharpness_row(f"test images blurred, sigma {key.removeprefix('blur_sigma_')} px / unblurred",
                                    sh[key]))
    return lines


def _smooth_decoder_lines(metrics: dict) -> list[str]:
    """The texture stage's before (best.pt) and after (the evaluated sharp.pt): test PSNR / SSIM and the decoder floor."""
    sm = metrics.get("smooth_decoder")
    if not sm:
        return []
    if "skipped" in sm:
        return ["", f"smooth decoder not compared: {sm['skipped']}"]
    rec = metrics["reconstruction"]["overall"]
    floor = ((metrics.get("domain") or {}).get("decoder_floor") or {}).get("fd_vs_train")
    smooth_floor = (sm.get("decoder_floor") or {}).get("fd_vs_train")
    return ["", "| test reconstruction by decoder | SSIM | PSNR (dB) | L1 | decoder floor: domain FD vs train |",
            "|---|---:|---:|---:|---:|",
            f"| sharp (sharp.pt, after the texture stage; evaluated) | {fmt(rec['ssim'])} | "
            f"{fmt(rec['psnr_db'], '{:.2f}')} | {fmt(rec['l1'])} | {fmt(floor, '{:.3f}')} |",
            f"| smooth (best.pt, before it) | {fmt(sm['ssim'])} | {fmt(sm['psnr_db'], '{:.2f}')} | "
            f"{fmt(sm.get('l1'))} | {fmt(smooth_floor, '{:.3f}')} |"]


def _reconstruction_lines(metrics: dict) -> list[str]:
    rec = metrics["reconstruction"]
    decoder = f" ({metrics['decoder']} decoder)" if metrics.get("decoder") else ""
    lines = [f"checkpoint epoch {metrics['checkpoint']['epoch']}{decoder} | {metrics['preset']} | "
             f"{metrics['image_size']} px | {metrics['perceptual_mode']}", "",
             "| test reconstruction | n | SSIM | PSNR (dB) | L1 |", "|---|---:|---:|---:|---:|"]
    for group in ("overall", *CLASSES):
        r = rec.get(group)
        if r:
            lines.append(f"| {group} | {r['n']} | {fmt(r['ssim'])} | {fmt(r['psnr_db'], '{:.2f}')} | {fmt(r['l1'])} |")
    floors = metrics.get("floors")
    if floors:
        n = rec["overall"]["n"]
        pca, mean = floors["pca"], floors["mean_image"]
        lines += [f"| floor: PCA, {pca['components']} components (fitted on train) | {n} | {fmt(pca['ssim'])} | "
                  f"{fmt(pca['psnr_db'], '{:.2f}')} | |",
                  f"| floor: the training mean image for everyone | {n} | {fmt(mean['ssim'])} | "
                  f"{fmt(mean['psnr_db'], '{:.2f}')} | |"]
    if rec.get("identity") is not None:
        pca_id = f" (PCA: {100 * floors['pca']['identity']:.1f} %)" if floors else ""
        dup = rec.get("test_images_with_a_duplicate") or 0
        dup_note = f"; {dup} test images have an exact duplicate, which counts as their own" if dup else ""
        lines += ["", f"identity: {100 * rec['identity']:.1f} % of test reconstructions are nearer (pixel MSE) to "
                      f"their own original than to any other test image{pca_id}{dup_note}"]
    return lines


def _sample_lines(metrics: dict) -> list[str]:
    ref = metrics["reference"]
    lines = ["", f"| samples ({metrics['n_generated']} per sampler) | FID | KID | MS-SSIM diversity | "
                 "NN-train RMSE (mean / min) |", "|---|---:|---:|---:|---:|"]
    for name, s in metrics["samplers"].items():
        lines.append(f"| {name} | {fmt(s['fid'], '{:.1f}')} | {fmt(s['kid_mean'])} | {fmt(s['ms_ssim_diversity']['mean'])} | "
                     f"{fmt(s['nn_train_rmse']['mean'])} / {fmt(s['nn_train_rmse']['min'])} |")
    tv = ref["train_vs_test"]
    lines.append(f"| real train vs test (floor) | {fmt(tv['fid'], '{:.1f}')} | {fmt(tv['kid_mean'])} | "
                 f"{fmt(ref['test_ms_ssim_diversity']['mean'])} | {fmt(ref['test_nn_train_rmse']['mean'])} / "
                 f"{fmt(ref['test_nn_train_rmse']['min'])} |")
    if ref.get("val_nn_train_rmse"):
        lines.append(f"| real validation images (held-out patients) | | | | {fmt(ref['val_nn_train_rmse']['mean'])} / "
                     f"{fmt(ref['val_nn_train_rmse']['min'])} |")
    return lines


def _domain_lines(metrics: dict) -> list[str]:
    dom = metrics.get("domain")
    if not dom:
        return []
    vv = dom.get("val_vs_train") or {}
    lines = ["", f"| domain features ({dom['feature_dim']}-d, extractor test accuracy "
                 f"{dom['extractor_test_accuracy']:.3f}) | FD vs test | KID vs test | FD vs train | "
                 f"KID vs train | FD vs train, n = {fmt(vv.get('n'), '{}')} |", "|---|---:|---:|---:|---:|---:|"]
    for name, s in metrics["samplers"].items():
        lines.append(f"| {name} | {fmt(s['domain_fd'], '{:.3f}')} | {fmt(s['domain_kid_mean'])} | "
                     f"{fmt(s['domain_fd_vs_train'], '{:.3f}')} | {fmt(s['domain_kid_vs_train'])} | "
                     f"{fmt(s.get('domain_fd_vs_train_at_val_n'), '{:.3f}')} |")
    fl, ft = dom["floor_train_vs_test"], dom["floor_train_vs_train"]
    lines.append(f"| real train images (floor) | {fmt(fl['fd'], '{:.3f}')} | {fmt(fl['kid_mean'])} | "
                 f"{fmt(ft['fd'], '{:.3f}')} | {fmt(ft['kid_mean'])} | |")
    if vv:
        lines.append(f"| real validation images (held-out patients: the bar) | | | | | {fmt(vv['fd'], '{:.3f}')} |")
    if dom.get("decoder_floor"):
        d = dom["decoder_floor"]
        lines.append(f"| decoder floor: reconstructed train images | | | {fmt(d['fd_vs_train'], '{:.3f}')} | "
                     f"{fmt(d['kid_vs_train'])} | |")
        lines.append(f"| reconstructed test images (carry the test shift) | | | "
                     f"{fmt(d['test_reconstructions_fd_vs_train'], '{:.3f}')} | | |")
    return lines


def metrics_table(metrics: dict) -> str:
    """The headline numbers of a metrics.json as markdown tables: reconstruction, samples, and where
    measured the domain features, the smooth decoder beside the sharp one, sharpness, TSTR and C2ST."""
    lines = _reconstruction_lines(metrics) + _sample_lines(metrics) + _domain_lines(metrics)
    lines += _smooth_decoder_lines(metrics)
    lines += _sharpness_lines(metrics)
    lines += _tstr_lines(metrics.get("tstr"))
    lines += _c2st_lines(metrics.get("c2st"))
    if metrics.get("learned_prior_unavailable"):
        lines += ["", f"learned prior not evaluated: {metrics['learned_prior_unavailable']}"]
    if metrics.get("inception_unavailable"):
        lines += ["", f"FID/KID not computed: {metrics['inception_unavailable']}"]
    return "\n".join(lines)


def ablation_table(rows: list[dict], base: Optional[Config] = None) -> str:
    """One markdown table: reconstruction on the test split (with identity), N(0, I) and GMM samples."""
    head = ("| variant | change | params | train s | test SSIM | PSNR dB | identity | N(0, I) dFD | GMM dFD | "
            "N(0, I) FID | GMM FID | N(0, I) MS-SSIM | GMM MS-SSIM |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        p, q = r["standard_normal"], r.get("gmm") or {}
        ident = r.get("test_identity")
        lines.append(
            f"| {r['variant']} | {r['change']} | {r['parameters'] / 1e6:.2f} M | {r['train_seconds']:.0f} | "
            f"{fmt(r['test_ssim'], '{:.3f}')} | {fmt(r['test_psnr_db'], '{:.2f}')} | "
            f"{fmt(None if ident is None else 100 * ident, '{:.1f} %')} | "
            f"{fmt(p['domain_fd_vs_train'], '{:.1f}')} | {fmt(q.get('domain_fd_vs_train'), '{:.1f}')} | "
            f"{fmt(p['fid'], '{:.1f}')} | {fmt(q.get('fid'), '{:.1f}')} | "
            f"{fmt(p['ms_ssim_diversity'], '{:.3f}')} | {fmt(q.get('ms_ssim_diversity'), '{:.3f}')} |")
    if base is not None:
        lines += ["", f"{base.data.image_size} px, {base.train.phase1.epochs} + {base.train.phase2.epochs} epochs "
                      f"per variant on the same images, seed {base.train.seed}; {perceptual_mode(base)}. "
                      "dFD = domain Fréchet distance to training images in the X-ray feature space "
                      "(lower is better; n/a without --features); FID n/a when the Inception weights are "
                      "unavailable; MS-SSIM = mean pairwise MS-SSIM of samples (lower = more diverse)."]
    return "\n".join(lines)


def bench_table(res: dict) -> str:
    lines = []
    m = res["machine"]
    lines.append(f"torch {m['torch']}, {m['cpus']} CPUs{', ' + m['cuda'] if m['cuda'] else ', no CUDA'}")
    if "data" in res:
        d = res["data"]
        k = d["kaggle_size_preprocess"]
        lines += ["", "| data | figure |", "|---|---:|",
                  f"| one-time preprocessing, Kaggle-size 1500x1200 JPEG, {k['processes']} processes | "
                  f"{k['images_per_s']:.0f} img/s |",
                  f"| the same, one process | {k['images_per_s_one_process']:.0f} img/s |",
                  f"| the same, naive full-size decode, {k['processes']} processes | "
                  f"{k['images_per_s_full_size_decode']:.0f} img/s |",
                  f"| cache file load ({d['cache_images']} train images at {d['image_size']} px) | "
                  f"{d['cache_load_seconds']:.2f} s |",
                  f"| one epoch of batches from the cache, num_workers=0 | {d['cached_epoch']['seconds']:.3f} s |",
                  f"| the same, num_workers=2 | {d['cached_epoch_2_workers']['seconds']:.3f} s |",
                  f"| one epoch decoding Kaggle-size originals instead | {d['decode_every_epoch_seconds']:.1f} s "
                  f"({d['decode_vs_cached']:.0f}x) |"]
        if "data_share_of_epoch" in d:
            lines.append(f"| cached data time / eager training epoch ({d['model_epoch_seconds']:.0f} s) | "
                         f"{d['data_share_of_epoch'] * 100:.2f}% |")
    st = res["step"]
    lines += ["", "| model | image | parameters | latent | GFLOPs/image forward | fwd+bwd | fwd+bwd with VGG16 loss |",
              "|---|---:|---:|---|---:|---:|---:|"]
    for fl in res.get("models", [res["flops"]]):
        lines.append(f"| {fl['preset']} | {fl['image_size']} | {fl['parameters']:,} | {tuple(fl['latent_shape'])} | "
                     f"{fl['model_forward'] / 1e9:.2f} | {fl['model_forward_backward'] / 1e9:.2f} | "
                     f"{fl['with_perceptual_forward_backward'] / 1e9:.2f} |")
    lines += ["", f"| training step, batch {st['batch']} at {st['image_size']} px | perceptual | img/s | "
                  "vs eager | step s | warm-up s | peak MB | safe |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in res["steps"]:
        if "error" in r:
            lines.append(f"| {r['setting']} | {'on' if r['perceptual'] else 'off'} | unavailable: {r['error']} "
                         "| | | | | |")
            continue
        lines.append(f"| {r['setting']} | {'on' if r['perceptual'] else 'off'} | {r['images_per_s']:.1f} | "
                     f"{fmt(r['speedup'], '{:.2f}x')} | {r['median_step_seconds']:.2f} | {r['warmup_seconds']:.1f} | "
                     f"{r['peak_memory_mb']:.0f} | {'yes' if r['safe'] else 'no'} |")
    rec = res["recommended"]
    lines += [""] + [f"fastest safe setting, {k.replace('_', ' ')}: {v['setting']} ({fmt(v['speedup'], '{:.2f}x')}"
                     f" eager) -> train {setting_flags(v['setting'])}" for k, v in rec.items()]
    t4 = res["t4_projection"]
    lines += [f"T4 projection of the {t4['epochs']}-epoch schedule ({t4['total_pflop']} PFLOP, FLOPs only): "
              + ", ".join(f"{h} h at {k}" for k, h in t4["hours"].items())]
    return "\n".join(lines)


def time_to_quality_table(res: dict) -> str:
    rows = res["table"]
    keys = list(rows[0]["minutes_to_db"]) if rows else []
    head = ("| run | epochs | minutes | test PSNR end of phase 1 | final PSNR | final SSIM | "
            + " | ".join(f"min to {k} dB" for k in keys) + " |")
    lines = [head, "|---" * (6 + len(keys)) + "|"]
    for r in rows:
        p1 = fmt(r["end_of_phase1_psnr"], "{:.2f}")
        reach = " | ".join("never" if v is None else f"{v:.1f}" for v in r["minutes_to_db"].values())
        lines.append(f"| {r['run']} | {r['epochs']} | {r['minutes']:.1f} | {p1} | {r['final_psnr']:.2f} | "
                     f"{r['final_ssim']:.3f} | {reach} |")
    return "\n".join(lines)


def setting_flags(name: str) -> str:
    """The `train --set` flags that select a measured setting (AMP is already on by default on CUDA)."""
    flags = []
    if "channels_last" in name:
        flags.append("--set train.channels_last=true")
    if "compile" in name:
        flags.append("--set train.compile=true")
    return " ".join(flags) or "(the defaults)"
