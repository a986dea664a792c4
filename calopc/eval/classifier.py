r"""The CaloChallenge binary classifier metric: a DNN told generated (0) from reference (1) showers.

Set-up as in the official evaluation: ``Linear(d, 2048) → LeakyReLU`` then two
``Linear(2048, 2048) → LeakyReLU`` blocks and ``Linear(2048, 1)``; Adam (lr 2e-4),
BCE-with-logits, batches of 1000, 50 epochs, float64; the epoch with the best
accuracy on the test split is kept; isotonic regression fitted on the test split
calibrates the probabilities; AUC and ``JSD = (ln 2 − BCE)/ln 2`` are computed on the
validation split. The split is per class: the official fixed counts (:data:`OFFICIAL_SPLITS`,
validation = the rest) when the sample is large enough, 60/20/20 % (rounded down, validation =
the rest) otherwise. Repeating with several seeds gives the mean and the standard deviation.

Inputs (``kind``):

* ``"low"``: ``[log10 E_inc, voxels / E_inc]`` (thresholded voxels);
* ``"low-normed"``: ``[log10 E_inc, voxel / (E_layer + 1e-16), log10(E_layer + 1e-8)]`` with
  ``E_layer`` the layer energy of the *thresholded* shower. ``normed="official"`` (default) divides
  the voxels as given, i.e. unthresholded when the raw file is passed, as the official evaluation
  does (a sub-threshold voxel in a layer whose thresholded energy is 0 becomes ~1e12–1e16);
  ``normed="calopc"`` divides the thresholded voxels, so every value lies in [0, 1];
* ``"high"``: the high-level feature vector (:func:`calopc.eval.features.high_level_vector`).
"""

from __future__ import annotations

__all__ = [
    "LOW_NORMED",
    "OFFICIAL_SPLITS",
    "ClassifierConfig",
    "ClassifierResult",
    "calibrated_scores",
    "check_sample_sizes",
    "classifier_inputs",
    "classifier_metric",
    "official_split",
    "raw_voxels",
    "train_classifier",
]

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ..geometry import Geometry

#: official per-class train/test/validation counts of the classifier split (validation takes the rest)
OFFICIAL_SPLITS = {
    "1-photons": (80_000, 20_000, 21_000),
    "1-pions": (80_000, 20_000, 20_800),
    "2": (60_000, 20_000, 20_000),
    "3": (60_000, 20_000, 20_000),
}

#: definitions of the low-normed classifier input (see the module doc)
LOW_NORMED = ("official", "calopc")


def official_split(dataset: str, n: int) -> tuple[int, int, int] | None:
    """The official fixed split counts of ``dataset`` if ``n`` showers per class suffice, else None."""
    counts = OFFICIAL_SPLITS.get(dataset)
    return counts if counts is not None and n >= sum(counts) else None


@dataclass(frozen=True)
class ClassifierConfig:
    hidden: int = 2048  # hidden units per layer
    n_layers: int = 2  # hidden 2048→2048 blocks after the input layer
    dropout: float = 0.0
    lr: float = 2e-4
    batch_size: int = 1000
    epochs: int = 50
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train, test (model selection + calibration), validation
    counts: tuple[int, int, int] | None = None  # fixed per-class train/test/validation counts; overrides split
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
                      high_level: np.ndarray | None = None, *, normed: str = "official",
                      threshold: float | None = None) -> np.ndarray:
    """Classifier input matrix for ``kind`` ('low', 'low-normed', 'high').

    Args:
        showers: ``(N, n_voxels)`` voxels; for ``low-normed`` with ``normed="official"`` pass the
            unthresholded ones (the layer energies are computed after thresholding here).
        normed: ``low-normed`` definition, ``"official"`` or ``"calopc"`` (module doc).
        threshold: cell threshold (MeV) for the layer energies; default the geometry's.
    """
    inc = np.asarray(incident, dtype=np.float64).reshape(-1, 1)
    if kind == "high":
        if high_level is None:
            msg = "high-level classifier needs the high-level feature vector"
            raise ValueError(msg)
        return np.asarray(high_level, dtype=np.float64)
    if kind == "low":
        return np.concatenate([np.log10(inc), showers / inc], axis=1)
    if kind == "low-normed":
        if normed not in LOW_NORMED:
            msg = f"low-normed definition must be one of {', '.join(LOW_NORMED)}, got {normed!r}"
            raise ValueError(msg)
        thr = geometry.threshold if threshold is None else threshold
        cut = np.where(showers < thr, 0.0, showers)
        e_layer = np.add.reduceat(cut, geometry.offsets[:-1], axis=1)
        per_cell = np.repeat(e_layer, geometry.voxels_per_layer, axis=1)
        vox = showers if normed == "official" else cut
        return np.concatenate([np.log10(inc), vox / (per_cell + 1e-16), np.log10(e_layer + 1e-8)], axis=1)
    msg = f"classifier kind must be one of low, low-normed, high; got {kind!r}"
    raise ValueError(msg)


def _split_sizes(n: int, cfg: ClassifierConfig) -> tuple[int, int]:
    """Per-class (train, test) sizes; validation takes the rest."""
    if cfg.counts is not None:
        if sum(cfg.counts) > n:
            msg = f"classifier split counts {cfg.counts} need {sum(cfg.counts)} showers per class, got {n}"
            raise ValueError(msg)
        return int(cfg.counts[0]), int(cfg.counts[1])
    return int(n * cfg.split[0]), int(n * cfg.split[1])


def raw_voxels(path, *, max_showers: int | None = None, geometry: Geometry | None = None,
               collisions: str = "sum") -> np.ndarray:
    """The voxels of a sample file as stored, without threshold, float32 ``(N, n_voxels)`` (Parquet: re-voxelised)."""
    from pathlib import Path

    from ..converters import open_points, points_to_voxels
    from ..io import open_showers

    path = Path(path)
    with path.open("rb") as fh:
        parquet = fh.read(4) == b"PAR1"
    parts, done = [], 0
    total = max_showers
    if parquet:
        with open_points(path) as f:
            for chunk in f.iterate(2000):
                parts.append(points_to_voxels(chunk, f.geometry, collisions=collisions, dtype=np.float32))
                done += len(parts[-1])
                if total is not None and done >= total:
                    break
    else:
        with open_showers(path, geometry=geometry) as f:
            for _, sh in f.iterate("128 MB"):
                parts.append(np.asarray(sh, dtype=np.float32))
                done += len(sh)
                if total is not None and done >= total:
                    break
    out = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    return out if total is None else out[:total]


def _fit_best(net, epochs: int, epoch, accuracy, *, desc: str, progress: bool) -> None:
    """The official schedule: ``epochs`` calls of ``epoch()``, keeping the weights with the best test
    accuracy (``accuracy()``), stopping early at 100 %; the best weights are loaded at the end."""
    from tqdm.auto import tqdm

    best_acc, best_state = -1.0, None
    for _ in tqdm(range(epochs), desc=desc, disable=None if progress else True, leave=False):
        epoch()
        acc = accuracy()
        if acc > best_acc:
            best_acc = acc
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        if acc >= 1.0:
            break
    net.load_state_dict(best_state)


def check_sample_sizes(n_gen: int, n_ref: int, what: str) -> None:
    """A classifier metric needs as many generated as reference showers (official set-up), at least 10 each."""
    if n_gen != n_ref:
        msg = (f"{what} needs as many generated as reference showers (official set-up), "
               f"got {n_gen} and {n_ref}; pass max_showers or use equal samples")
        raise ValueError(msg)
    if n_gen < 10:
        msg = f"{what} needs at least 10 showers per sample, got {n_gen}"
        raise ValueError(msg)


def calibrated_scores(p_test: np.ndarray, y_test: np.ndarray, p_val: np.ndarray, y_val: np.ndarray) -> tuple[float, float]:
    """Official calibration and scores: isotonic regression fitted on the test split, then AUC and
    JSD = (ln 2 − BCE) / ln 2 of the calibrated probabilities on the validation split."""
    from sklearn.isotonic import IsotonicRegression
    from sklearn.metrics import roc_auc_score

    iso = IsotonicRegression(out_of_bounds="clip", y_min=1e-6, y_max=1 - 1e-6)
    iso.fit(p_test, y_test)
    p = iso.predict(p_val)
    auc = float(roc_auc_score(y_val, p))
    bce = float(-np.mean(y_val * np.log(p) + (1 - y_val) * np.log(1 - p)))
    return auc, (math.log(2) - bce) / math.log(2)


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

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    dev = _resolve_device(device)
    dtype = getattr(torch, cfg.dtype)

    def split(x: np.ndarray) -> list[np.ndarray]:
        idx = rng.permutation(len(x))
        a, b = _split_sizes(len(x), cfg)
        return [x[idx[:a]], x[idx[a:a + b]], x[idx[a + b:]]]

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

    n = len(tens[0])

    def epoch() -> None:
        perm = torch.randperm(n, device=dev)
        for i in range(0, n, cfg.batch_size):
            b = perm[i:i + cfg.batch_size]
            opt.zero_grad()
            loss = loss_fn(net(tens[0][b]).squeeze(1), labs[0][b])
            loss.backward()
            opt.step()

    _fit_best(net, cfg.epochs, epoch, lambda: float(((predict(tens[1]) > 0.5) == labels[1]).mean()),
              desc=f"classifier (seed {seed})", progress=progress)
    return calibrated_scores(predict(tens[1]), labels[1], predict(tens[2]), labels[2])


def train_classifier(net, inputs, n_gen: int, n_ref: int, cfg: ClassifierConfig, *, seed: int = 0,
                     device: str = "auto", progress: bool = False, desc: str = "classifier") -> tuple[float, float]:
    """The official training/calibration protocol for any torch module; returns ``(AUC, JSD)`` on the validation split.

    The showers form one pool, generated first (``0 … n_gen − 1``, label 0) then reference (label 1);
    the per-class split, the epochs with model selection on the test accuracy, the isotonic calibration
    and the AUC/JSD are those of :func:`classifier_metric` (same split for the same seed).

    Args:
        net: a module returning one logit per shower, ``net(*inputs(idx)) -> (B,)`` or ``(B, 1)``;
            moved to ``device`` and ``cfg.dtype`` here.
        inputs: ``inputs(idx, device, dtype) -> tuple`` of the network inputs of pool showers ``idx`` (numpy int64).
    """
    import torch

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    dev = _resolve_device(device)
    dtype = getattr(torch, cfg.dtype)
    parts: list[list[np.ndarray]] = [[], [], []]
    for n, base in ((n_gen, 0), (n_ref, n_gen)):  # generated first, as classifier_metric draws them
        idx = rng.permutation(n) + base
        a, b = _split_sizes(n, cfg)
        for k, sl in enumerate((idx[:a], idx[a:a + b], idx[a + b:])):
            parts[k].append(sl)
    pools = [np.concatenate(p) for p in parts]
    labels = [(p >= n_gen).astype(np.float64) for p in pools]
    net = net.to(device=dev, dtype=dtype)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def logits(idx: np.ndarray) -> torch.Tensor:
        return net(*inputs(idx, dev, dtype)).reshape(-1)

    def predict(pool: np.ndarray) -> np.ndarray:
        net.eval()
        with torch.no_grad():
            out = torch.cat([torch.sigmoid(logits(pool[i:i + cfg.batch_size]))
                             for i in range(0, len(pool), cfg.batch_size)])
        net.train()
        return out.double().cpu().numpy()

    n_train = len(pools[0])

    def epoch() -> None:
        perm = pools[0][rng.permutation(n_train)]
        for i in range(0, n_train, cfg.batch_size):
            b = perm[i:i + cfg.batch_size]
            opt.zero_grad()
            loss = loss_fn(logits(b), torch.as_tensor((b >= n_gen).astype(np.float64), dtype=dtype, device=dev))
            loss.backward()
            opt.step()

    _fit_best(net, cfg.epochs, epoch, lambda: float(((predict(pools[1]) > 0.5) == labels[1]).mean()),
              desc=f"{desc} (seed {seed})", progress=progress)
    return calibrated_scores(predict(pools[1]), labels[1], predict(pools[2]), labels[2])


def classifier_metric(kind: str, x_gen: np.ndarray, x_ref: np.ndarray, *, config: ClassifierConfig | None = None,
                      seeds: int = 1, seed: int = 0, device: str = "auto", progress: bool = False) -> ClassifierResult:
    """Train the classifier ``seeds`` times; AUC and JSD as mean ± standard deviation."""
    cfg = config or ClassifierConfig()
    check_sample_sizes(len(x_gen), len(x_ref), "the classifier")
    aucs, jsds = [], []
    for s in range(seeds):
        a, j = _one_run(x_gen, x_ref, cfg, seed + s, device, progress)
        aucs.append(a)
        jsds.append(j)
    err = (lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else float("nan"))
    return ClassifierResult(kind, float(np.mean(aucs)), err(aucs), float(np.mean(jsds)), err(jsds), aucs, jsds,
                            n_train=_split_sizes(len(x_gen), cfg)[0] * 2, epochs=cfg.epochs)
