"""Classifiers for the OOD / open-set methods (msp, gram, openmax, conf_branch, vos, mos): networks,
input pipeline, the OpenOOD v1.5 training recipe, checkpoint loading, and the shared classifier
that post-hoc methods take from the worker cache. Not a method
module: it registers nothing.

Networks (module names as in OpenOOD, so its released checkpoints load as they are):

* ``resnet18_32x32`` — OpenOOD v1.5's CIFAR ResNet-18 (``openood/networks/resnet18_32x32.py``):
  3×3 stride-1 stem, no max-pool, four stages of two BasicBlocks (64, 128, 256, 512), global
  average pooling, ``fc``.
* ``wrn40_2`` — WideResNet-40-2 (Zagoruyko & Komodakis 2016) as in ``openood/networks/wrn.py`` and
  the VOS / Outlier-Exposure code (pre-activation blocks, dropout 0.3 inside blocks by default).
* ``bit_r50x1`` / ``bit_r101x1`` — BiT ResNet-v2 (Kolesnikov et al. 2020; MOS uses BiT-S-R101x1):
  pre-activation bottlenecks with weight-standardised convolutions and GroupNorm(32), built with
  timm's ``ResNetV2`` (``stem_type='fixed'``, StdConv2d eps 1e-8, as timm's BiT models); BiT's
  released ``.npz`` weights load through timm's reader (``load_bit_npz``).

``width_scale`` multiplies every channel count (1.0 = the published network); tests and the demo
grid use small scales.

Recipe (OpenOOD v1.5 CIFAR, ``configs/datasets/cifar10/cifar10.yml``, ``openood/trainers/
base_trainer.py``, ``configs/pipelines/train/baseline.yml``): 100 epochs, batch 128, SGD lr 0.1,
momentum 0.9, Nesterov, weight decay 5e-4, cosine annealing stepped every iteration from lr to
1e-6 (``cosine_annealing(step, epochs·len(loader), 1, 1e-6/lr)`` in a LambdaLR); training
transform RandomHorizontalFlip + RandomCrop(32, padding=4) (``base_preprocessor.py``);
checkpoint rule ``best`` (``checkpoint_rule``): after each epoch the accuracy on a held-out
part of the train split, the best epoch's weights kept (``openood/recorders/base_recorder.py``
``save_model``; ``scripts/eval_ood.py`` line 147 loads ``best.ckpt``), ``last`` keeps the final epoch;
normalisation by the mean / std the ID dataset declares (``Split.statistics``; CIFAR-10 and
CIFAR-100 declare OpenOOD's, ``openood/preprocessors/transform.py``: cifar10 [0.4914, 0.4822,
0.4465] / [0.2470, 0.2435, 0.2616], cifar100 [0.5071, 0.4867, 0.4408] / [0.2675, 0.2565, 0.2761]),
other datasets OpenOOD's fallback 0.5 / 0.5. Images enter with three channels (grey
repeated), at ``image_size`` (bilinear resize when they differ).

Sharing: ``shared_classifier`` trains (or loads) the cross-entropy classifier once per
(train split, architecture, recipe, seed) — or per checkpoint file — through ``ctx.cached``; MSP,
Gram, OpenMax and MOS's fine-tuning start all take it from there. ``classifier_affinity`` is the
runner's affinity key for those methods: equal recipes give equal keys.

Modules: ``nets``, ``checkpoints``, ``training`` (params, inputs, the training loop), ``posthoc``
(the shared classifier, ``PostHocMethod``).
"""
from methods.classifier.checkpoints import *  # noqa: F401,F403
from methods.classifier.nets import *  # noqa: F401,F403
from methods.classifier.posthoc import *  # noqa: F401,F403
from methods.classifier.training import *  # noqa: F401,F403
