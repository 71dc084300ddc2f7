# %% [markdown]
# # Auditing a model from a notebook
#
# `medaudit.audit` runs the same audit as `medaudit run`, on a model and data you hold in
# memory. Open this file as a notebook (Jupytext, VS Code, PyCharm: the `# %%` marks are
# cells) or run it: `python examples/notebook.py`. It trains a small classifier on
# synthetic phantom slices (about 20 s on 2 CPU cores) and audits it.

# %%
import torch
from torch import nn

import medaudit
from medaudit.plugins.datasets.phantom import Phantom, PhantomParams

torch.manual_seed(0)
train = Phantom(PhantomParams(n=512, size=32, seed=1)).load()  # nodule vs normal, pixels in [0, 1]
test = Phantom(PhantomParams(n=64, size=32, seed=2)).load()

# %% Your model: any torch module from pixels in [0, 1] to logits.
net = nn.Sequential(
    nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
    nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(32, 2),
)
optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
for step in range(120):
    i = torch.randint(0, len(train), (64,))
    loss = nn.functional.cross_entropy(net(train.images[i]), train.labels[i])
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
net.eval()

# %% The audit: the spec as a dict, without model and data (they are passed in memory).
spec = {
    "audit": {"name": "notebook-example", "title": "A notebook model against L-inf attacks"},
    "threat_model": {"norm": "linf", "epsilons": [0, "1/255", "4/255"]},
    "attacks": [{"name": "fgsm"}, {"name": "pgd", "params": {"steps": 10}}],
    "acceptance": {"criteria": [
        {"id": "AC-01", "metric": "clean_accuracy", "op": ">=", "threshold": 0.7},
        {"id": "AC-02", "metric": "robust_accuracy", "epsilon": "1/255", "op": ">=", "threshold": 0.3},
    ]},
    "runtime": {"device": "auto", "output_dir": "runs"},
}
res = medaudit.audit(spec, model=net, data=(test.images, test.labels), class_names=test.class_names)
print(res)  # in a notebook, `res` alone shows the verdict and the criteria as a table

# %% The numbers, as plain lists of dicts (pandas.DataFrame(res.rows()) makes a frame).
for row in res.rows():
    if row["attack"] == "worst_case" and row["metric"] == "robust_accuracy":
        print(f"worst case at {row['epsilon_label']:>6}: {row['value']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]")
for c in res.criteria():
    print(c["id"], c["verdict"], c["estimate"])
print("report:", res.report_path)
