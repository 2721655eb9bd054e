"""Command line: ``python -m shared.models summary|explain ...``.

``summary`` prints a model's size and cost as JSON; ``explain`` renders a lead-importance
figure (PNG) for one WFDB record: the 12 (or 15) leads, each coloured by its importance, a bar
chart of the importances and, for Cardioformer, its router (granularity) attention. Bad input
exits with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .factory import build_model, get_preset, list_models, parse_overrides


def count_forward_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass (``FlopCounterMode``; a multiply-add counts 2).

    Attention is forced onto PyTorch's math kernel while counting: the fused CPU flash kernel
    has no FLOP formula registered and would count as 0; the math kernel's matmuls are counted.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def model_summary(model: torch.nn.Module) -> dict[str, Any]:
    """Parameter counts, shapes and per-sample forward FLOPs of a built model."""
    cfg = model.config
    x = torch.randn(1, cfg["n_leads"], cfg["input_samples"])
    with torch.no_grad():
        model.eval()
        y = model(x)
    flops = count_forward_flops(model, x)
    return {
        "model": cfg["name"],
        "preset": cfg["preset"],
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "input_shape": ["batch", *x.shape[1:]],
        "output_shape": ["batch", *y.shape[1:]],
        "flops_per_sample": flops,
        "macs_per_sample": flops // 2,
        "config": cfg,
    }


def _build_from_args(args: argparse.Namespace) -> torch.nn.Module:
    preset = get_preset(args.model, args.preset)
    fs = args.fs if args.fs is not None else preset["fs"]
    seconds = args.seconds if args.seconds is not None else preset["seconds"]
    if fs <= 0 or seconds <= 0:
        raise ValueError(f"--fs and --seconds must be positive, got {fs} and {seconds}")
    overrides = parse_overrides(args.set or [])
    return build_model(
        args.model, args.preset,
        n_leads=args.leads if args.leads is not None else preset["n_leads"],
        input_samples=int(round(fs * seconds)),
        n_classes=args.classes if args.classes is not None else preset["n_classes"],
        dp=args.dp, fs=fs, **overrides,
    )


def cmd_summary(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    print(json.dumps(model_summary(_build_from_args(args)), indent=2))


# ---------------------------------------------------------------------------------------- explain


def read_record(site: str, path: str):
    """One record as an ``EcgRecord``, read by the site's reader (``read_record_path``)."""
    from shared.data.readers import read_record_path

    return read_record_path(site, path)


def record_windows(record, n_leads: int, fs: float, input_samples: int) -> np.ndarray:
    """The record as the loader would give it: cache preprocessing, then per-lead z-score."""
    from shared.data.preprocess import PreprocessConfig, preprocess_record

    if n_leads not in (12, 15):
        raise ValueError(f"explain reads 12- or 15-lead records; the model has {n_leads} leads")
    config = PreprocessConfig(fs=float(fs), window_seconds=input_samples / float(fs), leads="all" if n_leads == 15 else "standard")
    windows = preprocess_record(record, config).astype(np.float32)
    if windows.shape[1] != n_leads:
        raise ValueError(f"{record.source}: record has {windows.shape[1]} usable leads, the model needs {n_leads}")
    windows -= windows.mean(axis=2, keepdims=True)
    windows /= windows.std(axis=2, keepdims=True) + 1e-6
    return windows


def render_lead_importance(path: Path, signal: np.ndarray, fs: float, lead_names: list[str], importance: np.ndarray,
                           title: str, router: np.ndarray | None = None,
                           granularity_labels: list[str] | None = None) -> None:
    """One row per lead, trace coloured by that lead's importance, plus a bar chart; atomic PNG.

    ``router`` ``[G, G]`` (Cardioformer: router attention, mean over layers, heads and windows)
    adds a heat map of it, labelled with ``granularity_labels``, and a bar chart of the
    attention each granularity's router receives (the column means).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cm, colors

    n = len(lead_names)
    norm = colors.Normalize(vmin=0.0, vmax=max(float(importance.max()), 1e-9))
    cmap = cm.get_cmap("viridis") if hasattr(cm, "get_cmap") else matplotlib.colormaps["viridis"]
    with_router = router is not None
    fig = plt.figure(figsize=(17 if with_router else 12, max(0.55 * n + 1.6, 7.5 if with_router else 0)))
    grid = fig.add_gridspec(n, 3 if with_router else 2, width_ratios=[5, 1, 2.2] if with_router else [5, 1],
                            hspace=0.1, wspace=0.3 if with_router else 0.15)
    t = np.arange(signal.shape[1]) / fs
    for i, name in enumerate(lead_names):
        ax = fig.add_subplot(grid[i, 0])
        ax.plot(t, signal[i], lw=0.7, color=cmap(norm(importance[i])))
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
        if i < n - 1:
            ax.set_xticks([])
        else:
            ax.set_xlabel("time (s)")
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
    bars = fig.add_subplot(grid[:, 1])
    y = np.arange(n)
    bars.barh(y, importance, color=[cmap(norm(v)) for v in importance])
    bars.set_yticks(y, lead_names, fontsize=8)
    bars.invert_yaxis()
    bars.set_xlabel("lead importance")
    if with_router:
        labels = granularity_labels or [str(g) for g in range(router.shape[0])]
        half = n // 2 + 1
        heat = fig.add_subplot(grid[:half, 2])
        image = heat.imshow(router, cmap="viridis")
        heat.set_xticks(range(len(labels)), labels, fontsize=6, rotation=90)
        heat.set_yticks(range(len(labels)), labels, fontsize=6)
        heat.set_xlabel("key router (patch length)", fontsize=8)
        heat.set_ylabel("query router", fontsize=8)
        heat.set_title("router (granularity) attention", fontsize=9)
        fig.colorbar(image, ax=heat, fraction=0.046, pad=0.04)
        received = fig.add_subplot(grid[half + 1:, 2])
        received.bar(range(len(labels)), router.mean(axis=0), color="tab:blue")
        received.set_xticks(range(len(labels)), labels, fontsize=6, rotation=90)
        received.set_ylabel("attention received", fontsize=8)
        received.set_xlabel("granularity (patch length)", fontsize=8)
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def cmd_explain(args: argparse.Namespace) -> None:
    from .interpret import lead_importance
    from .state import load_checkpoint

    if args.checkpoint:
        model, extra = load_checkpoint(args.checkpoint)
        trained = True
        if (model.config["name"], model.config["preset"]) != (args.model, args.preset):
            print(f"note: using the checkpoint's model {model.config['name']}/{model.config['preset']}", file=sys.stderr)
    else:
        torch.manual_seed(0)
        model, extra, trained = _build_from_args(args), {}, False
    cfg = model.config
    fs = float(cfg.get("fs") or get_preset(cfg["name"], cfg["preset"])["fs"])
    record = read_record(args.site, args.record)
    windows = record_windows(record, cfg["n_leads"], fs, cfg["input_samples"])
    out = lead_importance(model, torch.from_numpy(windows))
    probs = torch.sigmoid(out["logits"]).mean(0).numpy() if "logits" in out else None
    importance = out["lead_importance"].mean(0).numpy()  # mean over the record's windows: [K or 1, leads]
    classes = list(extra.get("classes") or [f"class {k}" for k in range(cfg["n_classes"])])
    if len(classes) != cfg["n_classes"]:
        raise ValueError(f"checkpoint {args.checkpoint}: {len(classes)} class names for a model with {cfg['n_classes']} outputs")
    if args.class_index is not None:
        k = args.class_index
    elif importance.shape[0] > 1 and probs is not None:
        k = int(np.argmax(probs))
    else:
        k = 0
    if not 0 <= k < importance.shape[0]:
        raise ValueError(f"--class-index {k} is out of range: the model explains {importance.shape[0]} class(es)")
    label = classes[k] if importance.shape[0] == len(classes) else "all classes"
    prob = f", p={probs[k]:.2f}" if probs is not None and importance.shape[0] == len(probs) else ""
    predicted = classes[int(np.argmax(probs))] if probs is not None else None
    if predicted is not None and label == "all classes":
        prob = f" (most probable: {predicted}, p={probs.max():.2f})"
    status = "trained checkpoint " + Path(args.checkpoint).name if trained else "UNTRAINED model (no checkpoint): importances are not meaningful"
    title = (f"{cfg['name']}/{cfg['preset']} - {status}\n{args.site}:{record.record_id} - {label}{prob} - "
             f"{out['method']}, mean over {len(windows)} window(s)")
    from shared.data.record import PTB_LEADS, STANDARD_LEADS

    lead_names = list(PTB_LEADS if cfg["n_leads"] == 15 else STANDARD_LEADS)
    router, labels = None, None
    if out.get("router_attention") is not None:  # Cardioformer: [layers, windows, G, G]
        router = out["router_attention"].float().mean(dim=(0, 1)).numpy()
        labels = [f"g{g} p{p}" for g, p in enumerate(out["patch_lengths"])]  # patch lengths repeat
    render_lead_importance(Path(args.out), windows[0], fs, lead_names, importance[k], title, router, labels)
    info = {"out": str(args.out), "method": out["method"], "class": label, "predicted": predicted, "trained": trained,
            "windows": len(windows), "lead_importance": dict(zip(lead_names, importance[k].round(4).tolist()))}
    if router is not None:
        info["granularity_importance"] = dict(zip(labels, router.mean(axis=0).round(4).tolist()))
    print(json.dumps(info))


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, choices=list_models())
    p.add_argument("--preset", required=True)
    p.add_argument("--leads", type=int, help="number of leads (default: the preset's)")
    p.add_argument("--fs", type=float, help="sampling rate in Hz (default: the preset's)")
    p.add_argument("--seconds", type=float, help="input length in seconds (default: the preset's)")
    p.add_argument("--classes", type=int, help="number of classes (default: the preset's)")
    p.add_argument("--dp", action="store_true", help="the Opacus-compatible form")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a hyper-parameter (JSON value)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.models", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("summary", help="print params, shapes and FLOPs of a model as JSON")
    _model_args(p)
    p.set_defaults(func=cmd_summary)
    p = sub.add_parser("explain", help="render a lead-importance figure for one record")
    _model_args(p)
    p.add_argument("--record", required=True, help="WFDB record path without extension")
    p.add_argument("--site", required=True, help="site the record comes from (ptb, ptbxl, mimic, cinc)")
    p.add_argument("--checkpoint", help="checkpoint written by shared.models.save_checkpoint")
    p.add_argument("--class-index", type=int, help="class to explain (default: the most probable)")
    p.add_argument("--out", required=True, help="output PNG path")
    p.set_defaults(func=cmd_explain)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # data-layer errors (RecordError, DatasetRootError) are user input errors
        from shared.data.errors import DataError

        if isinstance(exc, DataError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
