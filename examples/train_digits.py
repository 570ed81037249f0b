"""An ordinary PyTorch training script, instrumented with layerscope's three lines.

Everything here is the user's own: the model, a DataLoader over scikit-learn's
digits, the optimizer and a LambdaLR schedule. layerscope adds the ``watch``
import, the ``with watch(...)`` block and ``w.step(...)`` (plus ``w.eval`` for
validation and ``w.should_stop`` for the dashboard's Stop button).

    python examples/train_digits.py                       # spool only: ./layerscope-runs/<id>/
    python examples/train_digits.py --server ws://127.0.0.1:8765
    python examples/train_digits.py --resume layerscope-runs/<id>/checkpoint-3000.pt --steps 4000

The run ends with a checkpoint (as the dashboard's Checkpoint button writes one): model,
optimizer, step, the dashboard's steering (lr scale, weight decay off, frozen layers) and,
through ``checkpoint_extras``, the LR schedule. ``--resume`` continues from such a file
(this one or any the button wrote): ``watch(resume=...)`` loads all of it back, the steps
go on from its step, and the steering is re-applied.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from layerscope.trainer import watch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 64)
        self.out = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Functional activations: layerscope reads dead units off fc1/fc2's outputs.
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))


def main() -> None:
    parser = argparse.ArgumentParser(description="Train an MLP on digits under layerscope.")
    parser.add_argument("--server", default=None, help="e.g. ws://127.0.0.1:8765 (optional)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--run-dir", default=None, help="where the spool goes")
    parser.add_argument("--resume", default=None, help="a checkpoint-N.pt to continue from")
    args = parser.parse_args()

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train = TensorDataset(x[:1500], y[:1500])
    val_x, val_y = x[1500:], y[1500:]
    loader = DataLoader(train, batch_size=64, shuffle=True)

    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** (step // 1000))

    with watch(
        model,
        optimizer,
        run="digits-example",
        server=args.server,
        run_dir=args.run_dir,
        checkpoint_extras={"scheduler": scheduler},  # saved in each checkpoint, and resumed
        resume=args.resume,
    ) as w:
        step = w.step_count  # 0, or the resumed checkpoint's step
        while step < args.steps and not w.should_stop:
            for xb, yb in loader:
                loss = F.cross_entropy(model(xb), yb)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                w.step(loss=loss)
                step += 1
                if step % 100 == 0:
                    model.eval()
                    with torch.no_grad():
                        logits = model(val_x)
                        w.eval(
                            val_loss=F.cross_entropy(logits, val_y),
                            val_acc=(logits.argmax(1) == val_y).float().mean(),
                        )
                    model.train()
                if step >= args.steps or w.should_stop:
                    break
        w.command("checkpoint")  # run_dir/checkpoint-<step>.pt: --resume continues from it
    print(f"done after {step} steps; run {w.run_id}")


if __name__ == "__main__":
    main()
