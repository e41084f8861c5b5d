"""Networks and input preprocessing shared by the deep one-class methods (dsvdd, dcae, fcdd,
fcdd_hsc, fcdd_ae). Not a method module: it registers nothing.

Sources (architectures and constants transcribed from the official code, layer by layer):

* Deep SVDD / DCAE — Ruff et al., "Deep One-Class Classification", ICML 2018;
  github.com/lukasruff/Deep-SVDD-PyTorch ``src/networks/mnist_LeNet.py``,
  ``src/networks/cifar10_LeNet.py``, ``src/datasets/{mnist,cifar10,preprocessing}.py``; the
  Fashion-MNIST LeNet of the authors' Deep SAD (ICLR 2020), github.com/lukasruff/Deep-SAD-PyTorch
  ``src/networks/fmnist_LeNet.py``.
* FCDD and its HSC / AE baselines — Liznerski et al., "Explainable Deep One-Class
  Classification", ICLR 2021; github.com/liznerski/fcdd ``python/fcdd/models/*.py``,
  ``python/fcdd/datasets/{fmnist,cifar,mvtec}.py``.

Preprocessing: global contrast normalisation with the l1 scale (GCN, per sample: subtract the mean
over all pixels and channels, divide by the mean absolute deviation) followed by min-max scaling
with per-normal-class constants, which the official code pre-computed on the normal training
images after GCN. ``fit_normalizer`` uses the constants the split's dataset declares for its normal
class (``Split.statistics``, ``data.base.ClassStatistics``: MNIST, Fashion-MNIST, CIFAR-10 and
MVTec AD declare the official ones); otherwise it computes min and max over the normal training
images after GCN itself and says so in ``Normalizer.source``.

Modules: ``preprocessing`` (GCN, ``Normalizer``, ``fit_normalizer``), ``lenet`` (Deep SVDD /
DCAE / Deep SAD LeNets, ``DSVDD_NETS``), ``receptive`` (receptive field, up-sampling, blur),
``fcdd_nets`` (FCDD, HSC and AE networks).
"""
from methods.deep_one_class.fcdd_nets import *  # noqa: F401,F403
from methods.deep_one_class.lenet import *  # noqa: F401,F403
from methods.deep_one_class.preprocessing import *  # noqa: F401,F403
from methods.deep_one_class.receptive import *  # noqa: F401,F403
