r"""The CaloChallenge binary classifier metric: a DNN told generated (0) from reference (1) showers.

Set-up as in the official evaluation: ``Linear(d, 2048) → LeakyReLU`` then two
``Linear(2048, 2048) → LeakyReLU`` blocks and ``Linear(2048, 1)``; Adam (lr 2e-4),
BCE-with-logits, batches of 1000, 50 epochs, float64; the epoch with the best
accuracy on the test split is kept; isotonic regression fitted on the test split
calibrates the probabilities; AUC and ``JSD = (ln 2 − BCE)/ln 2`` are computed on the
validation split. The split is 60/20/20 per class. Repeating with several seeds gives
the mean and the standard deviation.

Inputs (``kind``):

* ``"low"``: ``[log10 E_inc, voxels / E_inc]`` (thresholded voxels);
* ``"low-normed"``: ``[log10 E_inc, voxel / E_layer, log10(E_layer + 1e-8)]``;
* ``"high"``: the high-level feature vector (:func:`calopc.eval.features.high_level_vector`).
"""

from __future__ import annotations

__all__ = ["ClassifierConfig", "ClassifierResult", "classifier_inputs", "classifier_metric"]

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ..geometry import Geometry


@dataclass(frozen=True)
class ClassifierConfig:
    hidden: int = 2048  # hidden units per layer
    n_layers: int = 2  # hidden 2048→2048 blocks after the input layer
    dropout: float = 0.0
    lr: float = 2e-4
    batch_size: int = 1000
    epochs: int = 50
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train, test (model selection + calibration), validation
    dtype: str = "float64"


@dataclass
class ClassifierResult:
    kind: str
    auc: float
    auc_err: float
    jsd: float
    jsd_err: float
    aucs: list[float] = field(default_factory=list)
    jsds: list[float] = field(default_factory=list)
    n_train: int = 0
    epochs: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"AUC {self.auc:.4f} ± {self.auc_err:.4f}, JSD {self.jsd:.4f} ± {self.jsd_err:.4f}"


def classifier_inputs(kind: str, showers: np.ndarray, incident: np.ndarray, geometry: Geometry,
                      high_level: np.ndarray | None = None) -> np.ndarray:
    """Classifier input matrix for ``kind`` ('low', 'low-normed', 'high')."""
    inc = np.asarray(incident, dtype=np.float64).reshape(-1, 1)
    if kind == "high":
        if high_level is None:
            msg = "high-level classifier needs the high-level feature vector"
            raise ValueError(msg)
        return np.asarray(high_level, dtype=np.float64)
    if kind == "low":
        return np.concatenate([np.log10(inc), showers / inc], axis=1)
    if kind == "low-normed":
        e_layer = np.add.reduceat(showers, geometry.offsets[:-1], axis=1)
        per_cell = np.repeat(e_layer, geometry.voxels_per_layer, axis=1)
        return np.concatenate([np.log10(inc), showers / (per_cell + 1e-16), np.log10(e_layer + 1e-8)], axis=1)
    msg = f"classifier kind must be one of low, low-normed, high; got {kind!r}"
    raise ValueError(msg)


def _resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        msg = "device 'cuda' requested but torch sees no CUDA device"
        raise ValueError(msg)
    return torch.device(device)


def _one_run(x_gen: np.ndarray, x_ref: np.ndarray, cfg: ClassifierConfig, seed: int, device: str,
             progress: bool) -> tuple[float, float]:
    import torch
    from sklearn.isotonic import IsotonicRegression
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    dev = _resolve_device(device)
    dtype = getattr(torch, cfg.dtype)

    def split(x: np.ndarray) -> list[np.ndarray]:
        idx = rng.permutation(len(x))
        a = int(round(cfg.split[0] * len(x)))
        b = a + int(round(cfg.split[1] * len(x)))
        return [x[idx[:a]], x[idx[a:b]], x[idx[b:]]]

    parts = [np.concatenate([g, r]) for g, r in zip(split(x_gen), split(x_ref), strict=True)]
    labels = [np.concatenate([np.zeros(len(g)), np.ones(len(r))])
              for g, r in zip(split(np.empty(len(x_gen))), split(np.empty(len(x_ref))), strict=True)]
    # raw inputs, as in the official set-up (the inputs are already scaled: log10, /E_inc, /100)
    tens = [torch.as_tensor(p, dtype=dtype, device=dev) for p in parts]
    labs = [torch.as_tensor(y, dtype=dtype, device=dev) for y in labels]

    d = parts[0].shape[1]
    layers: list[torch.nn.Module] = [torch.nn.Linear(d, cfg.hidden), torch.nn.LeakyReLU(), torch.nn.Dropout(cfg.dropout)]
    for _ in range(cfg.n_layers):
        layers += [torch.nn.Linear(cfg.hidden, cfg.hidden), torch.nn.LeakyReLU(), torch.nn.Dropout(cfg.dropout)]
    layers.append(torch.nn.Linear(cfg.hidden, 1))
    net = torch.nn.Sequential(*layers).to(device=dev, dtype=dtype)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def predict(x: torch.Tensor) -> np.ndarray:
        net.eval()
        with torch.no_grad():
            out = torch.cat([torch.sigmoid(net(x[i:i + 10_000])).squeeze(1) for i in range(0, len(x), 10_000)])
        net.train()
        return out.cpu().numpy()

    best_acc, best_state = -1.0, None
    n = len(tens[0])
    from tqdm.auto import tqdm

    for _ in tqdm(range(cfg.epochs), desc=f"classifier (seed {seed})", disable=None if progress else True, leave=False):
        perm = torch.randperm(n, device=dev)
        for i in range(0, n, cfg.batch_size):
            b = perm[i:i + cfg.batch_size]
            opt.zero_grad()
            loss = loss_fn(net(tens[0][b]).squeeze(1), labs[0][b])
            loss.backward()
            opt.step()
        acc = float(((predict(tens[1]) > 0.5) == labels[1]).mean())
        if acc > best_acc:
            best_acc = acc
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        if acc >= 1.0:
            break
    net.load_state_dict(best_state)
    iso = IsotonicRegression(out_of_bounds="clip", y_min=1e-6, y_max=1 - 1e-6)
    iso.fit(predict(tens[1]), labels[1])
    p = iso.predict(predict(tens[2]))
    y = labels[2]
    auc = float(roc_auc_score(y, p))
    bce = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    jsd = (math.log(2) - bce) / math.log(2)
    return auc, jsd


def classifier_metric(kind: str, x_gen: np.ndarray, x_ref: np.ndarray, *, config: ClassifierConfig | None = None,
                      seeds: int = 1, seed: int = 0, device: str = "auto", progress: bool = False) -> ClassifierResult:
    """Train the classifier ``seeds`` times; AUC and JSD as mean ± standard deviation."""
    cfg = config or ClassifierConfig()
    if len(x_gen) != len(x_ref):
        msg = (f"the classifier needs as many generated as reference showers (official set-up), "
               f"got {len(x_gen)} and {len(x_ref)}; pass max_showers or use equal samples")
        raise ValueError(msg)
    if len(x_gen) < 10:
        msg = f"the classifier needs at least 10 showers per sample, got {len(x_gen)}"
        raise ValueError(msg)
    aucs, jsds = [], []
    for s in range(seeds):
        a, j = _one_run(x_gen, x_ref, cfg, seed + s, device, progress)
        aucs.append(a)
        jsds.append(j)
    err = (lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else float("nan"))
    return ClassifierResult(kind, float(np.mean(aucs)), err(aucs), float(np.mean(jsds)), err(jsds), aucs, jsds,
                            n_train=int(round(cfg.split[0] * len(x_gen))) * 2, epochs=cfg.epochs)
