r"""DeepTree: showers grown as trees by a graph-network generator, trained as a GAN.

The generator starts from one root node per shower holding a noise vector and grows a tree
level by level: every node is split into ``branches[i]`` children by a learned branching map
that sees the node, the shower's condition and ``n_global`` features pooled over the level.
After each split the new nodes receive messages from **all their ancestors** (one GIN layer
from torch-geometric, edges ancestor → descendant built by index arithmetic). The leaves of
the last level are cut to the shower's number of points, each kept leaf is given its layer
(layers are handed out from the per-layer counts, so they hold exactly) and a point head maps
it (with ``leaf_noise`` fresh noise features per leaf, which the published generator does not
have) to the variant-II point features ``(α, r, log E/E_layer)`` (see :mod:`.preprocess`).

Numbers of points and energies per layer come from the shared :class:`.shower.ShowerModel`,
trained jointly; at generation the energies of the points of each layer are rescaled to the
layer energy sampled by the shower model (``energy_rescale``, default on; the published
DeepTree's weakest observable was ``E_tot/E_inc``).

Two critics (``critic``):

* ``"pool"`` (published): points are pooled iteratively to 30, 6 and 1 learned nodes by
  attention from learned seeds, with one spectral-normalised sub-critic (FFN → sum → FFN) per
  level;
* ``"meanfield"`` (MDMA-style): points attend to a few learned global tokens and the tokens
  to the points, ``O(N)`` per block; the score is read from the tokens.

Both see the same per-point inputs: the point features, the layer of the point, that layer's
(count, energy) shower features and the condition. Training: hinge loss plus 0.1 feature
matching (critic features of real and generated showers), Adam with separate learning rates
for generator (1e-5) and critic (3e-5) and ``critic_steps`` critic updates per generator
update, through the custom training-step interface of :mod:`.train`. One draw of generated showers
serves the last critic update and the generator update, and the critic's pass over the real batch
gives the feature-matching target: three critic passes and one generator pass per step. The pool
critic's first level attends to the real points only, packed in chunks of one shower each (the
padded layout has 2.7× more slots on dataset 2); both are the same functions as the textbook
versions (see :meth:`DeepTree.training_step` and :meth:`critics._Attention.forward_packed`).

Usage::

    calopc train deeptree --data train.parquet --out run/                 # the published ds2 tree
    calopc train deeptree --data ds3.parquet --out run3/ --set model.preset=ds3 --set model.critic=meanfield
    calopc generate run/ --energies log-uniform:1e3:1e6 -n 1000 -o gen.hdf5

Tree presets: ``ds2`` (published: branches 2-3-4-5-5-10 = 6,000 leaves, features 64-25-15-10-8-6-4)
and ``ds3`` (3-4-5-6-8-10 = 28,800 leaves, above the 21,570 points of the largest of 4,000 synthetic
dataset-3 showers); ``auto`` picks by the number of cells of the geometry.

References:
    | DeepTreeGAN (Scham et al., 2023) | https://arxiv.org/abs/2311.12616
    | DeepTreeGANv2, iterative pooling (Scham et al., 2023) | https://arxiv.org/abs/2312.00042
    | MDMA, mean-field attention (Käch, Melzer-Pellmann, 2023) | https://arxiv.org/abs/2305.15254
    | GIN (Xu et al., 2019) | https://arxiv.org/abs/1810.00826
"""

from __future__ import annotations

__all__ = ["PRESETS", "DeepTree", "DeepTreeConfig", "MeanFieldCritic", "PoolCritic", "TreeGenerator"]

from .critics import MeanFieldCritic, PoolCritic
from .generator import TreeGenerator
# building blocks other modules and tests import from here (as from the former single module)
from .layers import _OncePerUpdateSpectralNorm, _sn_weights_changed, spectral_norm  # noqa: F401
from .config import ALPHA_MODES, CRITICS, PRESET_SIZES, PRESETS, DeepTreeConfig  # noqa: F401
from .model import DeepTree, _adam  # noqa: F401
