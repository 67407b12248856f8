"""Train the three-layer associative memory (examples/digits_memory.py) on scikit-learn's 8x8 digits
to complete masked images and to classify.

The model (``generated.digits_memory``): pixels v (identity Lagrangian, 64), hidden h (softmax,
N memories) and labels c (softmax, 10), joined by E = -g_h . (W g_v) - g_h . (U g_c), with hamux's
dynamics x_l <- x_l - (eta / tau_l)(x_l + dE/dg_l). The fixed points read as an associative memory:
the pixels settle on W^T g_h and the labels on U^T g_h, convex combinations of the N rows of W
(stored images) and U (their labels) weighted by softmax(beta (W g_v + U g_c)).

The recipe, and why:

* Data: ``sklearn.datasets.load_digits`` (1797 images, bundled, no download), pixels scaled from
  0..16 to [0, 1] so that a reconstruction error reads in units of full ink; a stratified 80/20
  train/test split (``--seed``). The model sees the pixels centred: the image minus the mean
  training image.
* Masks: ``--mask bottom`` (default) hides rows 4..7 of every image, the hard case (the visible
  top half alone leaves a 3 and a 9, a 7 and a 9 alike) and the one that draws clearly;
  ``--mask random`` hides a random half of the pixels of each image (drawn anew each epoch, fixed
  for the test images). A masked pixel is set to 0 in the centred pixels, that is to the mean
  image's value: its evidence for the hidden units, W g_v, is then nothing rather than "no ink"
  (a pixel's state carries no flag saying it is hidden). With [0, 1] pixels masked to 0 instead,
  a random half of the pixels completes worse (0.041 against 0.029 per masked pixel, seed 0) and
  the accuracy is up to 2 points lower; the bottom mask, always the same pixels, completes a little
  better (0.036 to 0.038 against 0.037 to 0.042 over seeds 0..2).
* A clamp fixes a whole neuron layer, so the visible pixels cannot be held while the masked ones
  move. Two passes, each with whole-layer clamps, give the two tasks:

  1. classify: the pixels clamped to the whole image, hidden and labels free from 0; the loss is
     the cross-entropy of the final label activation softmax(x_c) against the digit;
  2. complete: every layer free, the pixels starting at the masked image, hidden and labels at 0;
     the loss is the squared error of the final pixel activation on the masked pixels, summed
     over an image's masked pixels, so that both losses are per image and neither carries a
     tuned weight. The completion shown is the masked image with its masked pixels taken from
     the model (the visible ones drift towards the stored images too; their drift is not
     penalised).

  The labels of pass 2 are free and not trained: their argmax, the digit read from the masked
  image, is reported as a by-product (``accuracy_masked``).
* Adam (lr 1e-2, cosine decay to 0 over the epochs so that the final weights do not jitter),
  batches of 64, the gradient through all the steps (one autograd Function, the derived VJPs).
* The model: beta = 1, eta = 0.5, 8 steps, tau = 1 for each layer, the example's declared
  defaults, which train as they are; N = 512 memories where the example declares 256 (in a short
  sweep, [0, 1] pixels and 100 epochs, 512 completed at 0.039 per masked pixel against 0.043,
  the accuracy alike; beta 2 or 16 steps gained nothing). 150 epochs, about a minute on one
  thread; the numbers are in docs/results/digits.md.

What the completion is: the state after the 8 steps, a point on the way down, not a fixed
point. Run on (``accuracy_4x_steps``, ``mse_masked_4x_steps``: the trained weights with 4x the
steps), the label read with the pixels clamped stays (that pass settles within the steps) but the
free dynamics go on sharpening the hidden softmax towards a single memory, whose pixels W^T g_h
the training never asked to look like a digit: the completion error rises above the mean
image's. Training with 24 steps instead moves the problem rather than removing it (checked: the
error at 24 steps is worse, and it rises again past them).

Reported on the test images: the accuracy of pass 1, the reconstruction error of pass 2 (mean
squared error per masked pixel), and references: the mean training image as the completion
(trivial), ridge regression from the masked image to the whole image (linear), the mean of the 5
training images nearest on the visible pixels (k-nearest neighbours), and logistic regression on
the whole image for the accuracy (chance is 10%).

The energy: ``lay.trace`` gives the total energy (hamux's, with the Legendre terms) before each
step and after the last, for a few test images one at a time, in float64 (a copy of the trained
layer) so that rounding cannot pass for a rise; each trace must not increase (by more than the
float64 tolerance of energyc.tolerances). Both passes are checked and drawn.

Usage:

    python examples/train_digits.py --out runs/digits            # the full run, about a minute
    python examples/train_digits.py --quick --out /tmp/digits    # a smoke run, seconds
    python examples/train_digits.py --mask random --out runs/digits_random

Writes ``OUT/digits_reconstructions.png`` (test digits: original, masked, completed),
``OUT/digits_energy.png`` (the total energy per step, both passes) and
``OUT/digits_metrics.json`` (the numbers, the training curve, the energy traces).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from typing import Any

import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from energyc.tolerances import tolerance  # noqa: E402
from generated.digits_memory import Layer  # noqa: E402

SIDE, PIXELS, CLASSES = 8, 64, 10


# -- data ----------------------------------------------------------------------------------------


def load(n_images: int | None, seed: int) -> dict[str, torch.Tensor]:
    """The digits as float32 pixels in [0, 1] (images, 64) and int64 labels, split 80/20 with the
    classes in proportion; ``n_images`` takes a stratified subset first (``--quick``)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    if n_images is not None and n_images < len(X):
        X, _, y, _ = train_test_split(X, y, train_size=n_images, stratify=y, random_state=seed)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, stratify=y, random_state=seed)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return dict(x_train=as_x(Xtr), y_train=as_y(ytr), x_test=as_x(Xte), y_test=as_y(yte))


def masks(kind: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 64) booleans, True where a pixel is hidden: the bottom four rows, or a random half of
    each image's pixels."""
    if kind == "bottom":
        m = torch.zeros(PIXELS, dtype=torch.bool)
        m[PIXELS // 2:] = True
        return m.expand(n, PIXELS).clone()
    order = torch.rand(n, PIXELS, generator=generator).argsort(dim=1)
    m = torch.zeros(n, PIXELS, dtype=torch.bool)
    m.scatter_(1, order[:, : PIXELS // 2], True)
    return m


# -- the two passes ------------------------------------------------------------------------------


def zeros(lay: Layer, n: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """The initial hidden and label states of n images: 0 (uniform activations)."""
    return torch.zeros(n, 1, lay.N, dtype=dtype), torch.zeros(n, 1, CLASSES, dtype=dtype)


def classify(lay: Layer, x: torch.Tensor) -> torch.Tensor:
    """Pass 1: the pixels clamped to the (centred) images x (n, 64); the label activations
    (n, 10) after the dynamics."""
    v = x[:, None]
    h, c = zeros(lay, len(x), x.dtype)
    v, h, c = lay(v, h, c, clamp=("pixels",))
    return lay.activations(v, h, c)[2][:, 0]


def complete(lay: Layer, x_masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 2: every layer free, the pixels from the (centred) masked images (n, 64); the pixel
    and label activations (n, 64), (n, 10) after the dynamics."""
    v = x_masked[:, None]
    h, c = zeros(lay, len(x_masked), x_masked.dtype)
    v, h, c = lay(v, h, c)
    g_v, _, g_c = lay.activations(v, h, c)
    return g_v[:, 0], g_c[:, 0]


def losses(lay: Layer, x: torch.Tensor, y: torch.Tensor,
           m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, averaged over the batch: the label cross-entropy of pass 1 and the squared error
    of pass 2 summed over the masked pixels (x: centred images, m: their masks)."""
    p = classify(lay, x)
    ce = torch.nn.functional.nll_loss(torch.log(p.clamp_min(torch.finfo(p.dtype).tiny)), y)
    g_v, _ = complete(lay, x.masked_fill(m, 0.0))
    se = ((g_v - x) ** 2 * m).sum(1).mean()
    return ce, se


# -- references ----------------------------------------------------------------------------------


def baselines(data: dict[str, torch.Tensor], m_test: torch.Tensor, m_train: torch.Tensor,
              seed: int, k: int = 5) -> dict[str, float]:
    """The references on the test images: reconstruction error per masked pixel of the mean
    training image, of ridge regression from the masked image to the image (trained on the
    training images under their own masks, a masked pixel given the mean image's value as the
    model's input gives it), of the mean of the k training images nearest on the
    visible pixels; and the accuracy of logistic regression on whole images."""
    from sklearn.linear_model import LogisticRegression, Ridge

    xtr, xte = data["x_train"], data["x_test"]

    def error(pred: torch.Tensor) -> float:
        return float((((pred - xte) ** 2) * m_test).sum() / m_test.sum())

    mean = xtr.mean(0).expand_as(xte)
    ridge = Ridge(alpha=1.0).fit(torch.where(m_train, mean[0], xtr).numpy(), xtr.numpy())
    pred_ridge = torch.tensor(ridge.predict(torch.where(m_test, mean, xte).numpy()),
                              dtype=torch.float32)
    visible = (~m_test).float()
    dist = (((xte[:, None] - xtr[None]) ** 2) * visible[:, None]).sum(-1)
    nearest = dist.topk(min(k, len(xtr)), largest=False).indices
    pred_knn = xtr[nearest].mean(1)
    logreg = LogisticRegression(max_iter=2000, random_state=seed)
    logreg.fit(xtr.numpy(), data["y_train"].numpy())
    return {"mse_mean_image": error(mean), "mse_ridge": error(pred_ridge),
            f"mse_knn{k}": error(pred_knn),
            "accuracy_logistic_regression": float(logreg.score(xte.numpy(),
                                                               data["y_test"].numpy()))}


# -- the energy ----------------------------------------------------------------------------------


def energy_traces(lay: Layer, x: torch.Tensor, m: torch.Tensor) -> dict[str, Any]:
    """The total energy per step of both passes for each (centred) image of x, one at a time, on a
    float64 copy of the layer, and whether each trace is non-increasing (a rise above the float64
    tolerance of energyc.tolerances counts)."""
    lay64 = copy.deepcopy(lay).to(torch.float64)
    rtol, atol = tolerance(torch.float64)
    out: dict[str, Any] = {"classify": [], "complete": []}
    worst, ok = -math.inf, True
    for k in range(len(x)):
        v = x[k:k + 1, None].double()
        h, c = zeros(lay64, 1, torch.float64)
        for name, start, clamp in (("classify", v, ("pixels",)),
                                   ("complete", v.masked_fill(m[k:k + 1, None], 0.0), ())):
            totals = [step["total"] for step in lay64.trace(start, h, c, clamp=clamp)]
            out[name].append(totals)
            for a, b in zip(totals, totals[1:]):
                worst = max(worst, b - a)
                ok = ok and b - a <= atol + rtol * abs(a)
    out["max_change"] = worst  # the largest change of the energy in one step (< 0: all fall)
    out["non_increasing"] = ok
    return out


# -- pictures ------------------------------------------------------------------------------------


def picture_reconstructions(path: str, x: torch.Tensor, m: torch.Tensor,
                            g_v: torch.Tensor, labels: torch.Tensor, pred: torch.Tensor) -> None:
    """Rows: the original test digits x, the masked input, the completion (the masked image with
    the model's pixels g_v, uncentred, where it was masked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(x)
    completed = torch.where(m, g_v.clamp(0, 1), x)
    rows = [("original", x), ("masked input", x.masked_fill(m, 0.0)), ("completed", completed)]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n, 1.25 * len(rows) + 0.3))
    for r, (name, images) in enumerate(rows):
        for k in range(n):
            ax = axes[r, k]
            ax.imshow(images[k].reshape(SIDE, SIDE).numpy(), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if k == 0:
                ax.set_ylabel(name, fontsize=9)
            if r == 0:
                ax.set_title(f"{int(labels[k])} (read {int(pred[k])})", fontsize=8)
    fig.suptitle("Test digits completed by the associative memory (title: the digit, and the "
                 "label read with the pixels clamped; the hidden pixels, blank in the masked "
                 "input, start at the mean image)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def picture_energy(path: str, traces: dict[str, Any]) -> None:
    """The total energy per step of each traced test image, one panel per pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    titles = {"classify": "classify: pixels clamped", "complete": "complete: all layers free"}
    for ax, name in zip(axes, ("classify", "complete")):
        for totals in traces[name]:
            ax.plot(range(len(totals)), totals, marker=".", linewidth=1)
        ax.set_title(titles[name], fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("total energy")
        ax.grid(alpha=0.3)
    verdict = "non-increasing" if traces["non_increasing"] else "NOT monotone"
    fig.suptitle(f"Energy of the dynamics, {len(traces['classify'])} test images "
                 f"(float64): {verdict}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- training ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="folder for the pictures and digits_metrics.json")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 300 images, N 64, 40 epochs of batches of 32 (seconds)")
    p.add_argument("--mask", choices=("bottom", "random"), default="bottom")
    p.add_argument("--epochs", type=int, default=None, help="default 150 (--quick: 40)")
    p.add_argument("--N", type=int, default=None, help="hidden memories, default 512 (--quick: 64)")
    p.add_argument("--images", type=int, default=None, help="a stratified subset (--quick: 300)")
    p.add_argument("--batch", type=int, default=None, help="default 64 (--quick: 32)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--eta", type=float, default=None, help="the layer's step (its default)")
    p.add_argument("--steps", type=int, default=None, help="dynamics steps (the layer's default)")
    p.add_argument("--beta", type=float, default=None,
                   help="the hidden softmax's inverse temperature (the layer's default)")
    p.add_argument("--traces", type=int, default=6, help="test images whose energy is traced")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--no-progress", action="store_true")
    return p


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train, evaluate, draw; the metrics (also OUT/digits_metrics.json)."""
    torch.set_num_threads(args.threads)
    quick = args.quick
    epochs = args.epochs if args.epochs is not None else (40 if quick else 150)
    n_hidden = args.N if args.N is not None else (64 if quick else 512)
    n_images = args.images if args.images is not None else (300 if quick else None)
    batch = args.batch if args.batch is not None else (32 if quick else 64)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    data = load(n_images, args.seed)
    xtr, ytr, xte, yte = data["x_train"], data["y_train"], data["x_test"], data["y_test"]
    m_test = masks(args.mask, len(xte), gen)
    mean = xtr.mean(0)  # the model sees x - mean; a masked pixel is the mean image's
    ctr, cte = xtr - mean, xte - mean

    kwargs = {k: v for k, v in dict(eta=args.eta, steps=args.steps, beta=args.beta).items()
              if v is not None}
    lay = Layer(N=n_hidden, **kwargs)
    opt = torch.optim.Adam(lay.parameters(), lr=args.lr)
    batches = math.ceil(len(xtr) / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * batches))

    start = time.perf_counter()
    curve = []
    bar = tqdm(range(epochs), desc="epochs", disable=args.no_progress, file=sys.stdout)
    for epoch in bar:
        order = torch.randperm(len(xtr), generator=gen)
        m_train = masks(args.mask, len(xtr), gen)
        sums = [0.0, 0.0]
        for b in range(batches):
            idx = order[b * batch:(b + 1) * batch]
            ce, se = losses(lay, ctr[idx], ytr[idx], m_train[idx])
            opt.zero_grad()
            (ce + se).backward()
            opt.step()
            sched.step()
            sums[0] += ce.item() * len(idx)
            sums[1] += se.item() * len(idx)
        curve.append({"epoch": epoch + 1, "train_ce": sums[0] / len(xtr),
                      "train_se": sums[1] / len(xtr)})
        bar.set_postfix(ce=f"{curve[-1]['train_ce']:.3f}", se=f"{curve[-1]['train_se']:.3f}")
    train_s = time.perf_counter() - start

    with torch.no_grad():
        p = classify(lay, cte)
        g_v, g_c = complete(lay, cte.masked_fill(m_test, 0.0))
        g_v = g_v + mean
        longer = Layer(N=n_hidden, **{**kwargs, "steps": 4 * lay.config[1]})
        longer.load_state_dict(lay.state_dict())
        g_v_long = complete(longer, cte.masked_fill(m_test, 0.0))[0] + mean
        accuracy_long = float((classify(longer, cte).argmax(1) == yte).float().mean())
    pred = p.argmax(1)
    metrics: dict[str, Any] = {
        "accuracy": float((pred == yte).float().mean()),
        "accuracy_masked": float((g_c.argmax(1) == yte).float().mean()),
        "mse_masked": float((((g_v - xte) ** 2) * m_test).sum() / m_test.sum()),
        # the trained weights run for 4x the steps: how far the readings are from a fixed point
        "accuracy_4x_steps": accuracy_long,
        "mse_masked_4x_steps": float((((g_v_long - xte) ** 2) * m_test).sum() / m_test.sum()),
        "chance": 1.0 / CLASSES,
    }
    metrics.update(baselines(data, m_test, masks(args.mask, len(xtr), gen), args.seed))
    traces = energy_traces(lay, cte[: args.traces], m_test[: args.traces])
    metrics.update({
        "energy_non_increasing": traces["non_increasing"],
        "energy_max_step_change": traces["max_change"],
        "train_s": train_s, "threads": args.threads,
        "train_images": len(xtr), "test_images": len(xte),
        "config": {"mask": args.mask, "epochs": epochs, "N": n_hidden, "batch": batch,
                   "lr": args.lr, "eta": lay.config[0], "steps": lay.config[1],
                   "beta": float(lay.beta), "tau": lay.tau, "seed": args.seed, "quick": quick},
        "curve": curve, "energy_traces": {k: traces[k] for k in ("classify", "complete")},
    })

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        first = [int((yte == d).nonzero()[0]) for d in range(CLASSES) if (yte == d).any()]
        picture_reconstructions(os.path.join(args.out, "digits_reconstructions.png"),
                                xte[first], m_test[first], g_v[first], yte[first], pred[first])
        picture_energy(os.path.join(args.out, "digits_energy.png"), traces)
        with open(os.path.join(args.out, "digits_metrics.json"), "w", encoding="utf-8") as fh:
            json.dump(metrics, fh, indent=1)
    report(metrics)
    return metrics


def report(m: dict[str, Any]) -> None:
    """The results as a small table."""
    knn = next(k for k in m if k.startswith("mse_knn"))
    rows = [
        ("test accuracy, pixels clamped", f"{m['accuracy']:.3f}",
         f"logistic regression {m['accuracy_logistic_regression']:.3f}, chance {m['chance']:.2f}"),
        ("test accuracy, from the masked image", f"{m['accuracy_masked']:.3f}", "(not trained)"),
        ("reconstruction MSE per masked pixel", f"{m['mse_masked']:.4f}",
         f"mean image {m['mse_mean_image']:.4f}, ridge {m['mse_ridge']:.4f}, "
         f"{knn[4:]} {m[knn]:.4f}"),
        ("the same, run for 4x the steps", f"{m['accuracy_4x_steps']:.3f}",
         f"accuracy; reconstruction MSE {m['mse_masked_4x_steps']:.4f}"),
        ("energy non-increasing (float64)", str(m["energy_non_increasing"]),
         f"largest change in one step {m['energy_max_step_change']:.2e}"),
        ("training time", f"{m['train_s']:.1f} s", f"{m['threads']} torch thread(s)"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value, ref in rows:
        print(f"{name:<{width}}  {value:>8}  {ref}")


def main(argv: list[str] | None = None) -> int:
    train(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
