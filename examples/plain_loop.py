"""Probe the loss geometry along a plain PyTorch training loop (seconds on a CPU).

    python examples/plain_loop.py [RUN_DIR]        # default runs/example-plain; then: geomprobe report RUN_DIR

A small random-init MLP learns a synthetic classification task with SGD; the probe measures the Hessian's
extreme eigenvalues and R_med at the start, every 25 steps while that stays within 20 % of wall time, and once
more at the end. The budget predicts a probe's cost from the training steps it has timed before it lets one
run, so on a model this small (a probe costs more than all 100 steps) it vetoes the periodic probes.
"""

import sys

import torch
from torch import nn

import geomprobe as gp

run_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/example-plain"
torch.manual_seed(0)
X = torch.randn(256, 10)
y = (X[:, 0] + 0.5 * X[:, 1] > 0).long()
model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 2))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
loss_fn = nn.CrossEntropyLoss()

probe = gp.GeometryProbe(model, loss_fn, probe_data=(X[:128], y[:128]),   # fixed probe batch
                         metrics={"spectrum": {"k": 1}, "rmed": {}},
                         schedule=gp.at([0]) | (gp.every(25) & gp.budget(0.2)),  # at(): outside the budget
                         run_dir=run_dir, force=True)                    # force: replace an earlier example run
probe.attach(optimizer)            # probes step 0 now, then after the optimizer steps the schedule selects
for step in range(100):            # the loop itself is unchanged
    batch = torch.randint(0, 256, (32,))
    optimizer.zero_grad()
    loss_fn(model(X[batch]), y[batch]).backward()
    optimizer.step()
probe.close()                      # probes the last step if the schedule did not, and closes the run

for r in probe.records:
    print(f"step {r['step']:4d}  loss {r['loss']:.4f}  λ_max {r['spectrum']['lambda_max']:.4f} "
          f"± {r['spectrum']['lambda_max_err']:.1e}")
skips = probe.skips.to_dict()  # probes the budget vetoed: a tiny model trains faster than it is probed
print(f"{skips['scheduled']} probes scheduled, {skips['skipped']} skipped to stay within the budget")
print(f"run written to {run_dir}; see it with: geomprobe report {run_dir}")
