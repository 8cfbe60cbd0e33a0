"""Probe the loss geometry of a Lightning training run with one callback (seconds on a CPU).

    python examples/lightning_loop.py [RUN_DIR]    # default runs/example-lightning

The callback draws its probe samples from the trainer's train DataLoader at train start and uses the
module's own ``training_step`` as the loss; it probes at ``trainer.global_step`` (optimizer steps).
"""

import sys
import warnings

import lightning.pytorch as L
import torch
from torch import nn

import geomprobe as gp

run_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/example-lightning"
warnings.filterwarnings("ignore", module="lightning")  # its hints about dataloader workers on a tiny CPU run


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


torch.manual_seed(0)
X = torch.randn(256, 10)
y = (X[:, 0] > 0).long()
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=32, shuffle=True)

callback = gp.integrations.lightning.GeometryProbeCallback(
    run_dir=run_dir, force=True, metrics={"spectrum": {"k": 1}, "precond": {"k": 1}},
    schedule=gp.every(20), probe_samples=128)
trainer = L.Trainer(max_steps=50, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
trainer.fit(Classifier(), loader)

for r in gp.RunReader(run_dir).records:
    # precond reads Adam's second moments, so the probe before the first step skips it (no state yet)
    pre = f"{r['precond']['lambda_max']:.4g}" if "precond" in r else "— (no optimizer state yet)"
    print(f"step {r['step']:3d}  loss {r['loss']:.4f}  λ_max {r['spectrum']['lambda_max']:.4f}  "
          f"λ_max(P½HP½) {pre}" + ("  (end of training)" if r.get("final") else ""))
print(f"run written to {run_dir}; see it with: geomprobe report {run_dir}")
