"""Shared machinery of ``fcdd``, ``fcdd_hsc`` and ``fcdd_ae`` (Liznerski et al., "Explainable Deep
One-Class Classification", ICLR 2021; official code liznerski/fcdd@4fa850215792b5f4a3405151e30127a5b67dc3b6:
python/fcdd/runners/argparse_configs.py, datasets/mvtec.py, datasets/mvtec_base.py,
datasets/noise_modes.py, datasets/online_supervisor.py, datasets/outlier_exposure/cifar100.py,
training/bases.py, training/setup.py). Not a method module:
it registers nothing.

What lives here:

* the paper's per-dataset recipes (``FAMILIES``: optimiser, schedule, epochs, batch size, weight
  decay, Gaussian std of the heatmap kernel, preprocessing, augmentation, anomaly source, training-set
  repeats per epoch), chosen by the network's input size: 28 px (Fashion-MNIST config), 32 px
  (CIFAR-10 config), 224 px (MVTec-AD config);
* ``enlarge``: the MVTec-AD recipe repeats the training set 10 times per epoch (``ADMvTec.enlarge =
  True``, datasets/mvtec.py:14; ``MvTec.__init__`` repeats data 10x, mvtec_base.py:90-91) and the
  lr scheduler steps once per such epoch (training/bases.py:204), so its 200 epochs are 2,000
  passes over the images with 200 lr decays;
* confetti noise (``confetti_noise``) and the "malformed normal" anomalies made from it;
* the online supervisor: each training image is replaced with probability ``supervise_p`` (0.5)
  by an anomaly from the selected source (confetti | oe | semi), as fcdd's ``OnlineSupervisor``;
  ``anomaly_source: auto`` is the recipe's: outlier exposure with CIFAR-100 for the 28 / 32 px
  recipes (DefaultFmnistConfig / DefaultCifar10Config: supervise_mode 'noise', noise_mode 'cifar100'),
  confetti-noise malformed normals for the 224 px one (DefaultMvtecConfig); grey outlier images are
  made with ITU-R 601 luma (torchvision ``Grayscale``, outlier_exposure/cifar100.py:49);
* the pseudo-Huber losses (Eq. 1 HSC, Eq. 2 FCDD, Eq. 3 FCDD with ground-truth maps);
* ``FCDDFamily``: the fit / score skeleton the three methods share.

Outlier exposure and semi-supervision hooks (call before ``fit``):

* ``method.set_outlier_exposure(images)``: ``images`` is a ``Split``, an N×H×W×C uint8 array or a
  list of such images; they replace the outlier set below.
* Without the hook the outlier images come from the data side (``data.base.OutlierExposure``,
  read by ``data.protocols.outlier_exposure_split``; the method never loads a dataset itself):
  the set the grid's dataset entry names (``outlier_exposure: {name: cifar100, root: ...}``,
  carried by the train split, part of the cell's identity); else the params' ``oe_dataset`` /
  ``oe_dataset_params`` (existing grids); else the recipe's default, CIFAR-100's train side at
  28 / 32 px. Naming different sets in the entry and the params is an error; an unregistered
  dataset raises NotImplementedError naming what is missing.
* ``method.set_true_anomalies(split)``: labelled anomalies (rows with label 1; with ``split.masks``
  when available, which switches FCDD to the pixel-wise Eq. 3). Rows with label 1 in the train split
  are used too.

Modules: ``recipes`` (FAMILIES, params, Setup), ``confetti``, ``augment``, ``losses``, ``family``
(FCDDFamily).
"""
from methods.fcdd_family.augment import *  # noqa: F401,F403
from methods.fcdd_family.confetti import *  # noqa: F401,F403
from methods.fcdd_family.family import *  # noqa: F401,F403
from methods.fcdd_family.losses import *  # noqa: F401,F403
from methods.fcdd_family.recipes import *  # noqa: F401,F403
