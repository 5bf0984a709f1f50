"""The edge of stability, seen by TangentProbe: full-batch GD sharpens until the sharpness reaches 2/η, and the top
tangent Lyapunov exponent of the training map I − ηH hovers at 0 there.

Cohen, Kaur, Li, Kolter & Talwalkar (2021), "Gradient descent on neural networks typically occurs at the edge of
stability": under full-batch GD with step size η the top Hessian eigenvalue (the sharpness) first rises (progressive
sharpening), then stops at 2/η and oscillates around it while the loss keeps falling, non-monotonically. For GD the
tangent map is I − ηH, so the sharpness crossing 2/η is exactly a tangent exponent crossing 0.

Here: a tanh MLP (64-64-10) trained with square loss on 1000 real sklearn digits, full batch, float32, one CPU
thread. Run::

    python examples/edge_of_stability.py              # ~1 minute: 1500 steps, figure in docs/edge_of_stability.png
    python examples/edge_of_stability.py --quick      # ~20 s, for the tests
"""

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_chaos.demo import load_digits_tensors
from lightning_chaos.tangent import TangentProbe

FIGURE = Path(__file__).resolve().parents[1] / "docs" / "edge_of_stability.png"


class SquareLossMLP(L.LightningModule):
    """A tanh MLP with square loss on one-hot targets, as in Cohen et al.'s main experiments; plain full-batch GD."""

    def __init__(self, lr: float, width: int = 64) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                                 nn.Linear(width, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = 0.5 * (self.net(x) - nn.functional.one_hot(y, 10).to(x.dtype)).pow(2).sum(1).mean()
        self.log("train_loss", loss, prog_bar=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lr", type=float, default=None, help="GD step size η (default 0.15; 0.2 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 1500; 400 with --quick)")
    parser.add_argument("--examples", type=int, default=1000, help="digits in the full batch")
    parser.add_argument("--sharpness-every", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="a short run (about 20 s on one CPU thread)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the figure")
    args = parser.parse_args(argv)
    lr = args.lr or (0.2 if args.quick else 0.15)
    steps = args.steps or (400 if args.quick else 1500)
    sharpness_every = args.sharpness_every or 10
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)

    images, labels = load_digits_tensors()
    data = TensorDataset(images[: args.examples], labels[: args.examples])
    loader = DataLoader(data, batch_size=len(data))  # full batch: gradient descent, not SGD
    probe = TangentProbe(num_exponents=1, sharpness=True, sharpness_every=sharpness_every)
    losses = LossRecorder()
    trainer = L.Trainer(max_epochs=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[probe, losses])
    start = time.perf_counter()
    trainer.fit(SquareLossMLP(lr), loader)
    seconds = time.perf_counter() - start

    sharpness = probe.sharpness_history.tolist()
    at = probe.sharpness_steps.tolist()
    threshold = 2.0 / lr
    history = probe.spectrum_history[:, 0]
    per_step = history * torch.arange(1, len(history) + 1) - torch.cat([history.new_zeros(1),
                                                                        history[:-1] * torch.arange(1, len(history))])
    tail = [s for s, t in zip(sharpness, at) if t >= 0.7 * steps]
    plateau = sum(tail) / len(tail) / threshold
    first_edge = next((t for s, t in zip(sharpness, at) if s >= 0.95 * threshold), None)
    late = per_step[int(0.7 * len(per_step)):]
    result = {
        "lr": lr,
        "steps": steps,
        "seconds": seconds,
        "threshold": threshold,
        "sharpness": sharpness,
        "sharpness_steps": at,
        "plateau_ratio": plateau,
        "first_step_at_edge": first_edge,
        "top_exponent_late_mean": late.mean().item(),
        "top_exponent_late_abs_mean": late.abs().mean().item(),
        "losses": losses.losses,
    }
    print(f"full-batch GD, η = {lr}, {steps} steps on {len(data)} digits, {seconds:.0f} s on one CPU thread")
    print(f"  sharpness at step 0: {sharpness[0]:.2f}   2/η = {threshold:.2f}")
    print(f"  first reached 0.95·2/η at step {first_edge}")
    print(f"  plateau (last 30 % of steps): sharpness / (2/η) = {plateau:.3f}   [Cohen et al. 2021: ≈ 1, hovering"
          " just above 2/η; their Fig. 1: 2/η reached, then held]")
    print(f"  top tangent exponent per step over the last 30 %: mean {result['top_exponent_late_mean']:+.4f},"
          f" mean |λ| {result['top_exponent_late_abs_mean']:.4f} (0: at the edge, neither stable nor unstable)")
    print(f"  loss: {losses.losses[0]:.4f} → {losses.losses[-1]:.4f} (non-monotone at the edge:"
          f" {sum(b > a for a, b in zip(losses.losses, losses.losses[1:]))} increases)")
    if not args.no_plot:
        plot(result, history, per_step)
    return result


def plot(result: dict, running: torch.Tensor, per_step: torch.Tensor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    axes[0].plot(result["losses"], color="black")
    axes[0].set_ylabel("train loss")
    axes[0].set_yscale("log")
    axes[1].plot(result["sharpness_steps"], result["sharpness"], color="tab:blue", label="sharpness λ_max(H)")
    axes[1].axhline(result["threshold"], color="tab:red", ls="--", label="2/η")
    axes[1].set_ylabel("sharpness")
    axes[1].legend(loc="lower right")
    window = 20
    smoothed = torch.nn.functional.avg_pool1d(per_step[None, None], window, 1)[0, 0]
    axes[2].plot(range(1, len(per_step) + 1), per_step, color="tab:gray", lw=0.5, alpha=0.5, label="ln R₁₁ per step")
    axes[2].plot(range(window, len(per_step) + 1), smoothed, color="tab:green", label=f"{window}-step mean")
    axes[2].axhline(0, color="black", lw=0.5)
    axes[2].set_ylim(-0.1, 0.1)
    axes[2].set_ylabel("top tangent exponent")
    axes[2].set_xlabel("optimizer step")
    axes[2].legend(loc="lower right")
    fig.suptitle(f"Edge of stability on digits: full-batch GD, η = {result['lr']} (TangentProbe)")
    fig.tight_layout()
    FIGURE.parent.mkdir(exist_ok=True)
    fig.savefig(FIGURE, dpi=110)
    print(f"  figure: {FIGURE}")


if __name__ == "__main__":
    main(sys.argv[1:])
