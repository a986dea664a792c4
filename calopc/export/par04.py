r"""The conventions of Geant4's ML fast-simulation example Par04, pinned from its source.

Par04 (``examples/extended/parameterisations/Par04`` in the Geant4 repository) runs a generator
through ONNX Runtime behind ``Par04InferenceSetup::GetEnergies`` (``src/Par04InferenceSetup.cc``) and
``Par04OnnxInference::RunInference`` (``src/Par04OnnxInference.cc``). For its default model type
``VAE`` it

* builds one float vector per shower, of size ``L + 4``: ``L`` (``/Par04/inference/setSizeLatentVector``)
  draws of ``CLHEP::RandGauss::shoot(0, 1)``, then ``E / fMaxEnergy`` (``E`` the particle's kinetic energy
  in MeV, ``fMaxEnergy = 1024000`` MeV), ``(θ / deg) / fMaxAngle`` (``θ`` the polar angle of the particle's
  direction, ``fMaxAngle = 90``), and the geometry one-hot ``[0, 1]``. ``fMaxEnergy`` and ``fMaxAngle`` are
  member defaults with no macro command: a model whose energy scale differs needs a rebuilt Par04;
* feeds it as a ``[1, L + 4]`` float32 tensor to the model's first input (a model must have exactly one
  input) and reads the first ``N_r · N_φ · N_z`` floats of the first output;
* multiplies each value by ``E``: the outputs are cell energies as fractions of the incident energy;
* orders the cells as ``GetPositions`` loops: r outermost, then φ, then z fastest, so cell
  ``(i_r, i_φ, i_z)`` is output ``(i_r N_φ + i_φ) N_z + i_z``; the φ bin centre is
  ``(i_φ + ½) 2π / N_φ − π`` and the radius ``(i_r + ½) · 2.325`` mm (``/Par04/inference/setSizeOfRhoCells``),
  the depth ``(i_z + ½) · 3.4`` mm (``setSizeOfZCells``);
* deposits only values above 0.0005 MeV (``Par04MLFastSimModel::DoIt``).

calopc orders the cells of a shower ``(layer z, α, r)`` with r fastest and the same angular bin centres
``−π + (j + ½) 2π / n_α`` (:mod:`calopc.geometry`), so the two orders differ by a permutation
(:func:`par04_permutation`). CaloChallenge dataset 3 was made with this mesh (18 r × 50 φ × 45 z).

Importing this module does not import torch.
"""

from __future__ import annotations

__all__ = ["ANGLE_MAX", "CONDITION_SIZE", "DEPOSIT_CUT_MEV", "E_MAX_MEV", "GEOMETRY_ONE_HOT", "MESH",
           "Par04Harness", "check_par04_geometry", "input_vector", "macro_lines", "par04_index", "par04_permutation",
           "to_calopc_order"]

import math
import os
from dataclasses import dataclass

import numpy as np

from ..geometry import Geometry

#: Par04's readout mesh: (N_r, N_φ, N_z) cells and (r, z) cell sizes in mm (``Par04InferenceSetup.hh``,
#: ``examplePar04_onnx_vae.mac``)
MESH = {"n_r": 18, "n_phi": 50, "n_z": 45, "r_mm": 2.325, "z_mm": 3.4}
#: ``Par04InferenceSetup::fMaxEnergy`` (MeV) and ``fMaxAngle`` (degrees): fixed in the source, no macro command
E_MAX_MEV = 1024000.0
ANGLE_MAX = 90.0
#: entries after the latent vector: energy, angle, geometry one-hot (two)
CONDITION_SIZE = 4
#: what ``GetEnergies`` writes into the geometry one-hot (``genVector[L + 2] = 0; genVector[L + 3] = 1``)
GEOMETRY_ONE_HOT = (0.0, 1.0)
#: ``Par04MLFastSimModel::DoIt`` makes a hit only of a cell energy above this (MeV)
DEPOSIT_CUT_MEV = 0.0005


def par04_index(i_r: np.ndarray | int, i_phi: np.ndarray | int, i_z: np.ndarray | int) -> np.ndarray | int:
    """Par04's output index of cell ``(i_r, i_φ, i_z)``: r outermost, then φ, then z fastest."""
    return (np.asarray(i_r) * MESH["n_phi"] + np.asarray(i_phi)) * MESH["n_z"] + np.asarray(i_z)


def check_par04_geometry(geometry: Geometry, where: str = "") -> None:
    """ValueError (one line) unless ``geometry`` bins exactly as Par04's readout mesh (dataset 3).

    Checked: 45 layers, 50 α bins in every layer, r-edges ``0, 2.325, …, 41.85`` mm (18 bins) in
    every layer, and a layer thickness of 3.4 mm where the geometry records one.
    """
    n_r, n_phi, n_z = MESH["n_r"], MESH["n_phi"], MESH["n_z"]
    edges = np.arange(n_r + 1) * MESH["r_mm"]
    found = (f"{geometry.n_layers} layers, alpha bins {sorted(set(geometry.n_alpha))}, "
             f"r bins {sorted(set(geometry.n_r))} up to {max(e[-1] for e in geometry.r_edges):g} mm")
    ok = (geometry.n_layers == n_z and set(geometry.n_alpha) == {n_phi}
          and all(len(e) == n_r + 1 and np.allclose(e, edges, rtol=0, atol=1e-6) for e in geometry.r_edges)
          and (geometry.layer_mm is None or abs(geometry.layer_mm - MESH["z_mm"]) < 1e-9))
    if not ok:
        pre = f"{where}: " if where else ""
        msg = (f"{pre}geometry {geometry.name!r} ({found}) is not Par04's readout mesh (45 z x 50 phi x 18 r cells of "
               f"2.325 mm, CaloChallenge dataset 3); --target par04 needs a model trained on dataset 3, use "
               "--target points for other geometries")
        raise ValueError(msg)


def par04_permutation(geometry: Geometry) -> np.ndarray:
    """``perm`` with ``par04[..., i] = calopc[..., perm[i]]`` for showers on ``geometry`` (dataset 3's binning).

    Shapes:
        returns ``(40500,)`` int64.
    """
    check_par04_geometry(geometry)
    n_r, n_phi, n_z = MESH["n_r"], MESH["n_phi"], MESH["n_z"]
    i = np.arange(n_r * n_phi * n_z)
    i_r, rest = np.divmod(i, n_phi * n_z)
    i_phi, i_z = np.divmod(rest, n_z)
    return np.asarray(geometry.flat_index(i_z, i_phi, i_r), dtype=np.int64)


def to_calopc_order(par04: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Par04-ordered cells → calopc order (the inverse of :func:`par04_permutation`).

    Shapes:
        par04: ``(..., 40500)``; returns the same shape.
    """
    perm = par04_permutation(geometry)
    out = np.empty_like(par04)
    out[..., perm] = par04
    return out


def input_vector(latent: np.ndarray, energy_mev: np.ndarray | float, theta_rad: np.ndarray | float, *,
                 e_max: float = E_MAX_MEV, angle_max: float = ANGLE_MAX) -> np.ndarray:
    """The float vector ``GetEnergies`` builds for model type ``VAE``: ``[latent, E/E_max, (θ/deg)/angle_max, 0, 1]``.

    Args:
        latent: the ``N(0, 1)`` draws, ``(B, L)``.
        energy_mev: the particle's kinetic energy (MeV), ``(B,)`` or a number.
        theta_rad: the polar angle of the particle's direction (rad; π/2 for Par04's default gun along y).
        e_max, angle_max: ``fMaxEnergy`` (MeV) and ``fMaxAngle`` (degrees).

    Returns:
        ``(B, L + 4)`` float32.
    """
    latent = np.asarray(latent, dtype=np.float32)
    b = latent.shape[0]
    out = np.empty((b, latent.shape[1] + CONDITION_SIZE), dtype=np.float32)
    out[:, :-CONDITION_SIZE] = latent
    out[:, -4] = np.broadcast_to(np.asarray(energy_mev, dtype=np.float64) / e_max, (b,))
    out[:, -3] = np.broadcast_to(np.degrees(np.asarray(theta_rad, dtype=np.float64)) / angle_max, (b,))
    out[:, -2], out[:, -1] = GEOMETRY_ONE_HOT
    return out


def macro_lines(latent_size: int, model_path: str | os.PathLike) -> list[str]:
    """The Par04 macro commands that run an exported model (``examplePar04_onnx_vae.mac`` with this model)."""
    return [
        f"/Par04/inference/setSizeLatentVector {latent_size}",
        f"/Par04/inference/setSizeConditionVector {CONDITION_SIZE}",
        f"/Par04/inference/setModelPathName {os.fspath(model_path)}",
        "/Par04/inference/setModelType VAE",
        "/Par04/inference/setInferenceLibrary ONNX",
        f"/Par04/inference/setSizeOfRhoCells {MESH['r_mm']} mm",
        f"/Par04/inference/setSizeOfZCells {MESH['z_mm']} mm",
        f"/Par04/inference/setNbOfRhoCells {MESH['n_r']}",
        f"/Par04/inference/setNbOfPhiCells {MESH['n_phi']}",
        f"/Par04/inference/setNbOfZCells {MESH['n_z']}",
    ]


@dataclass
class Par04Harness:
    """Runs an exported model exactly as Par04's ``GetEnergies`` does, through onnxruntime.

    One session on ``threads`` intra-op threads with graph optimisations off (Par04's default
    ``/Par04/inference/setOptimizationFlag 0``), one ``[1, L + 4]`` call per shower (``batch`` > 1 stacks
    showers, which Par04 never does), the latent drawn from ``N(0, 1)``.

    Args:
        model_path: the ``.onnx`` file.
        latent_size: ``L`` (``/Par04/inference/setSizeLatentVector``).
        threads: ONNX Runtime intra-op threads (Par04: 1).
        optimize: ONNX Runtime graph optimisations (Par04's ``setOptimizationFlag``).
        e_max, angle_max: Par04's ``fMaxEnergy`` (MeV) and ``fMaxAngle`` (degrees).
    """

    model_path: str | os.PathLike
    latent_size: int
    threads: int = 1
    optimize: bool = False
    e_max: float = E_MAX_MEV
    angle_max: float = ANGLE_MAX

    def __post_init__(self) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if self.optimize
                                       else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        self.session = ort.InferenceSession(os.fspath(self.model_path), so, providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            msg = f"{self.model_path}: Par04 feeds one input, the model has {len(inputs)}"
            raise ValueError(msg)
        self.input_name = inputs[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.size = MESH["n_r"] * MESH["n_phi"] * MESH["n_z"]

    def run_vectors(self, vectors: np.ndarray) -> np.ndarray:
        """The model's first output for input vectors ``(B, L + 4)`` as Par04 reads it: the first
        ``N_r N_φ N_z`` values per shower, ``(B, 40500)`` float32 fractions of ``E``."""
        out = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(vectors, np.float32)})[0]
        return np.asarray(out).reshape(vectors.shape[0], -1)[:, :self.size]

    def energies(self, energy_mev: np.ndarray, *, theta_rad: float = math.pi / 2, seed: int = 0,
                 batch: int = 1, latent: np.ndarray | None = None) -> np.ndarray:
        """Cell energies (MeV) in Par04's order, ``aEnergies = output · E`` as ``GetEnergies`` returns them.

        Args:
            energy_mev: incident energies ``(N,)``.
            theta_rad: the particle's polar angle (Par04's gun along y: π/2).
            seed: seed of the ``N(0, 1)`` latent draws (CLHEP's engine in Geant4).
            batch: showers per call (Par04: 1).
            latent: the latent vectors ``(N, L)`` instead of drawing them.

        Returns:
            ``(N, 40500)`` float64 MeV, Par04 order (:func:`to_calopc_order` for calopc's).
        """
        e = np.asarray(energy_mev, dtype=np.float64).reshape(-1)
        if latent is None:
            latent = np.random.default_rng(seed).standard_normal((e.shape[0], self.latent_size))
        latent = np.asarray(latent, dtype=np.float64)
        if latent.shape != (e.shape[0], self.latent_size):
            msg = f"latent has shape {latent.shape}, expected ({e.shape[0]}, {self.latent_size})"
            raise ValueError(msg)
        out = np.empty((e.shape[0], self.size))
        for i in range(0, e.shape[0], batch):
            v = input_vector(latent[i:i + batch], e[i:i + batch], theta_rad, e_max=self.e_max,
                             angle_max=self.angle_max)
            out[i:i + batch] = self.run_vectors(v).astype(np.float64) * e[i:i + batch, None]
        return out
