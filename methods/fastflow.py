"""FastFlow: Yu et al., "FastFlow: Unsupervised Anomaly Detection and Localization via 2D
Normalizing Flows", arXiv:2111.07677 (2021), following the re-implementation the anomalib port is
built on (gathierry/FastFlow@2cf1f2f4c562a7f13cfb1959e3afe5df2f2d2565: fastflow.py, constants.py,
main.py, dataset.py, configs/*.yaml, requirements.txt).

* Weights: what ``timm.create_model(name, pretrained=True, ...)`` loaded under the reference's pin
  timm==0.5.4 (``PRESETS[...]["pretrained_tag"]``): timm's own ``racm_in1k`` WRN50-2 (not
  torchvision's ``tv_in1k``), torchvision's ResNet18, Facebook's DeiT / CaiT. ``pretrained_tag``
  picks other timm weights, ``weights: PATH`` a file.
* Features (Sec. 3, Table 6): a frozen ImageNet backbone. ResNet18 / Wide-ResNet50-2: the outputs
  of layer1, layer2 and layer3 (timm ``out_indices=[1, 2, 3]``), each passed through a trainable
  LayerNorm over (C, H, W) (reference code; not in the paper). DeiT (deit_base_distilled_patch16_384):
  the output of transformer block 7, CaiT (cait_m48_448): of block 40, both through the backbone's own
  frozen final LayerNorm, class / distillation tokens dropped, reshaped to a (C, H/16, W/16) map.
* 2-D flow (Sec. 3.3, Fig. 2): one FrEIA ``SequenceINN`` per feature stage, of ``flow_steps``
  ``AllInOneBlock``s (affine coupling, soft-clamped at alpha = 2, a fixed random hard channel
  permutation, a global affine scale). The coupling subnet is conv(k) - ReLU - conv(k) with
  hidden = int(C * hidden_ratio) channels, k alternating 3 and 1 (3 on even steps), or 3 throughout
  (``conv3x3_only``). Paper / reference settings per backbone (``PRESETS``): ResNet18 8 steps,
  hidden ratio 1, 3x3 only, 256 px; WRN50-2 8 steps, ratio 1, 3x3 / 1x1 alternating, 256 px;
  DeiT 20 steps, ratio 0.16, 384 px; CaiT 20 steps, ratio 0.16, 448 px.
* Training (Sec. 3, the change-of-variables formula log p_X(x) = log p_Z(f(x)) + log|det df/dx| with a
  standard normal p_Z): the loss of a batch is, summed over stages, the batch mean of
  0.5 * ||z||^2 - log|det J| (sum over C, H, W; the constant D/2 log 2 pi dropped), exactly as the
  reference code. Adam, lr 1e-3, weight decay 1e-5, batch 32, 500 epochs (reference constants.py),
  shuffled batches without the last partial one (``drop_last``). The model scored is the last
  epoch's (``checkpoint: last``): the reference README's "best" column is the maximum over its
  evaluations on the test set every 10 epochs (main.py ``train``), a selection on the test set.
* Inference (Sec. 3.3): per stage the map -exp(-0.5 * mean_C(z^2)) (the negative per-position
  likelihood), bilinearly up-sampled (align_corners=False) to the input size, averaged over stages;
  image score = the map's maximum (anomalib's ``pred_score``; the reference code scores pixels only).

Input: images resized to ``image_size`` (square, no crop; reference ``transforms.Resize``),
ImageNet mean / std.

Implementation: the frozen features come from the shared feature cache (``extract_features``), so the
backbone runs once per image, not once per epoch; the flows' hard channel permutations are applied as
an index gather (``GatherPermAllInOneBlock``, same numbers as FrEIA's 1×1-convolution form); Adam uses
torch's fused kernel where available. None of these changes a result.
"""
from __future__ import annotations

import math
from typing import Sequence

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import field_validator, model_validator
from torch import nn

from data.base import Split
from data.transforms import Transform
from methods.backbones import (BACKBONES, RESNET_STAGES, extract_features, get_backbone, spec_of,
                               spec_of_cheap, weights_tag)
from methods.base import LearningRate, Method, MethodParams, Scores, check_finite, register

CNN_LAYERS = list(RESNET_STAGES[:3])
# gathierry/FastFlow configs/*.yaml and fastflow.py (paper Table 6 block indices 7 and 40).
# ``pretrained_tag``: the weights ``timm.create_model(name, pretrained=True)`` loaded under the
# reference's pin (requirements.txt: timm==0.5.4; its timm/models/resnet.py, vision_transformer.py and
# cait.py default_cfgs), as today's timm tag: wide_resnet50_2 -> wide_resnet50_racm-8234f177.pth
# (timm's own RandAugment / cosine / mixup training, ``racm_in1k``, not torchvision's); resnet18 ->
# torchvision's resnet18-5c106cde.pth (``tv_in1k``; timm now fetches the same weights as
# resnet18-f37072fd.pth, while its untagged ``resnet18`` has become ``a1_in1k``); DeiT and CaiT ->
# Facebook's deit_base_distilled_patch16_384-d0272ac0.pth / M48_448.pth.
PRESETS: dict[str, dict] = {
    "resnet18": dict(image_size=256, flow_steps=8, hidden_ratio=1.0, conv3x3_only=True, layers=CNN_LAYERS,
                     pretrained_tag="tv_in1k"),
    "wide_resnet50_2": dict(image_size=256, flow_steps=8, hidden_ratio=1.0, conv3x3_only=False,
                            layers=CNN_LAYERS, pretrained_tag="racm_in1k"),
    "deit_base_distilled_patch16_384": dict(image_size=384, flow_steps=20, hidden_ratio=0.16,
                                            conv3x3_only=False, layers=["blocks.7"], pretrained_tag="fb_in1k"),
    "cait_m48_448": dict(image_size=448, flow_steps=20, hidden_ratio=0.16, conv3x3_only=False,
                         layers=["blocks.40"], pretrained_tag="fb_dist_in1k"),
}
# A CNN backbone not in PRESETS gets the ResNet settings (and methods.backbones' default weights);
# a transformer must name its block.
CNN_FALLBACK = dict(image_size=256, flow_steps=8, hidden_ratio=1.0, conv3x3_only=False, layers=CNN_LAYERS,
                    pretrained_tag=None)
TRANSFORMER_PREFIXES = ("deit", "vit", "cait")
# The reference trains NUM_EPOCHS = 500 and evaluates on the test set every EVAL_INTERVAL = 10 epochs
# (constants.py, main.py train()); its README reports the 500th epoch ("last") and the maximum over
# those test-set evaluations ("best"). The latter is a selection on the test set: rows are the last.
CHECKPOINT = "last"


def preset_of(backbone: str) -> dict | None:
    arch = backbone.split(".")[0]
    if arch in PRESETS:
        return PRESETS[arch]
    if arch.startswith(TRANSFORMER_PREFIXES):
        return None
    return CNN_FALLBACK


def weights_of(params: "FastFlowParams") -> tuple[str | None, str]:
    """(pretrained tag, the backbone name the features come from). The tag: the one in ``backbone``
    (``wide_resnet50_2.tv_in1k``), else ``pretrained_tag``, else the reference's (``PRESETS``). The
    name carries it only when timm weights are loaded (not for ``weights: PATH`` or random init) and
    they are not ``methods.backbones``' default for the name (so other methods' features are shared)."""
    arch, _, in_name = params.backbone.partition(".")
    tag = in_name or params.pretrained_tag or (preset_of(params.backbone) or {}).get("pretrained_tag")
    if params.pretrained and not params.weights and tag:
        default = BACKBONES.get(arch)
        return tag, arch if default is not None and default.timm_name == f"{arch}.{tag}" else f"{arch}.{tag}"
    return tag, arch


# ----------------------------------------------------------------------------- the flow
def subnet_conv(kernel_size: int, hidden_ratio: float):
    """FrEIA subnet constructor: conv(k) - ReLU - conv(k), hidden = int(C_in * hidden_ratio)."""

    def make(c_in: int, c_out: int) -> nn.Module:
        hidden = max(1, int(c_in * hidden_ratio))
        return nn.Sequential(nn.Conv2d(c_in, hidden, kernel_size, padding="same"), nn.ReLU(),
                             nn.Conv2d(hidden, c_out, kernel_size, padding="same"))

    return make


class GatherPermAllInOneBlock(Fm.AllInOneBlock):
    """FrEIA's ``AllInOneBlock`` with its hard channel permutation applied as an index gather.

    With ``permute_soft=False`` FrEIA applies the permutation as a 1×1 convolution with a 0/1 C×C
    matrix (``w_perm``): a dense C×C product per position, about a fifth of a FastFlow step's
    FLOPs. Indexing the channels gives the same numbers (each output is one input times 1) without
    that product. The matrix is drawn exactly as FrEIA draws it (same random stream), kept as the
    block's parameter, and only read here; soft or Householder permutations use FrEIA's path.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        index = inv_index = None
        if self.w_perm is not None and not self.householder:
            w = self.w_perm.detach().reshape(self.in_channels, self.in_channels)
            if bool(((w == 0) | (w == 1)).all()) and bool((w.sum(0) == 1).all()) and bool((w.sum(1) == 1).all()):
                index, inv_index = w.argmax(dim=1), w.argmax(dim=0)
        self.register_buffer("perm_index", index, persistent=False)
        self.register_buffer("perm_inv_index", inv_index, persistent=False)

    def _permute(self, x, rev=False):
        if self.perm_index is None:
            return super()._permute(x, rev)
        scale = self.global_scale_activation(self.global_scale)
        log_jac = torch.sum(torch.log(scale))
        if rev:
            return (x.index_select(1, self.perm_inv_index) - self.global_offset) / scale, log_jac
        return (x * scale + self.global_offset).index_select(1, self.perm_index), log_jac


def build_flow(chw: Sequence[int], flow_steps: int, hidden_ratio: float, conv3x3_only: bool,
               clamp: float = 2.0, block=GatherPermAllInOneBlock):
    """A FrEIA ``SequenceINN`` of ``flow_steps`` ``AllInOneBlock``s on C×H×W inputs (Fig. 2)."""
    flow = Ff.SequenceINN(*chw)
    for step in range(flow_steps):
        k = 1 if (step % 2 == 1 and not conv3x3_only) else 3
        flow.append(block, subnet_constructor=subnet_conv(k, hidden_ratio),
                    affine_clamping=clamp, permute_soft=False)
    return flow


def fastflow_loss(zs: Sequence[torch.Tensor], log_dets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Negative log-likelihood (change of variables) up to the constant: sum over stages of the batch mean of
    0.5 * ||z||^2 - log|det J| (reference fastflow.py)."""
    loss = zs[0].new_zeros(())
    for z, ld in zip(zs, log_dets):
        loss = loss + torch.mean(0.5 * torch.sum(z ** 2, dim=(1, 2, 3)) - ld)
    return loss


def log_likelihood(z: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
    """Exact per-sample log p_X(x) = log N(z; 0, I) + log|det J| (change of variables), z: B×C×H×W."""
    d = z[0].numel()
    return -0.5 * torch.sum(z ** 2, dim=(1, 2, 3)) - 0.5 * d * math.log(2 * math.pi) + log_det


def anomaly_map(zs: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """Mean over stages of -exp(-0.5 * mean_C(z^2)), bilinearly up-sampled to size×size: B×S×S."""
    maps = []
    for z in zs:
        prob = torch.exp(-0.5 * torch.mean(z ** 2, dim=1, keepdim=True))
        maps.append(F.interpolate(-prob, size=(size, size), mode="bilinear", align_corners=False))
    return torch.stack(maps, dim=-1).mean(dim=-1)[:, 0]


class FastFlowNet(nn.Module):
    """The trainable part: optional per-stage LayerNorm (CNN backbones) and one 2-D flow per stage."""

    def __init__(self, shapes: Sequence[tuple[int, int, int]], layer_norm: bool, flow_steps: int,
                 hidden_ratio: float, conv3x3_only: bool, clamp: float):
        super().__init__()
        self.norms = nn.ModuleList([nn.LayerNorm(list(s), elementwise_affine=True) for s in shapes]) \
            if layer_norm else None
        self.flows = nn.ModuleList([build_flow(s, flow_steps, hidden_ratio, conv3x3_only, clamp)
                                    for s in shapes])

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        zs, lds = [], []
        for i, f in enumerate(feats):
            if self.norms is not None:
                f = self.norms[i](f)
            z, ld = self.flows[i](f)
            zs.append(z)
            lds.append(ld)
        return zs, lds


def adam(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam (reference optimiser) with the fused kernel where torch has one: the same update,
    one pass over the parameters instead of a dozen small ops per tensor."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


# ----------------------------------------------------------------------------- the method
class FastFlowParams(MethodParams):
    """None = the paper's / reference setting for the backbone (``PRESETS``)."""

    backbone: str = "wide_resnet50_2"
    pretrained: bool = True
    pretrained_tag: str | None = None    # timm weights tag: racm_in1k (WRN50-2), tv_in1k (ResNet18)...
    weights: str | None = None           # a checkpoint file instead of timm's weights
    image_size: int | None = None        # 256 (ResNets), 384 (DeiT), 448 (CaiT)
    layers: list[str] | None = None      # layer1-3 (ResNets), blocks.7 (DeiT), blocks.40 (CaiT)
    flow_steps: int | None = None        # 8 (ResNets), 20 (transformers)
    hidden_ratio: float | None = None    # 1.0 (ResNets), 0.16 (transformers)
    conv3x3_only: bool | None = None     # True for ResNet18 only
    clamp: float = 2.0                   # AllInOneBlock affine_clamping (reference)
    epochs: int = 500                    # reference constants.py
    batch_size: int = 32
    lr: LearningRate = 1e-3
    weight_decay: float = 1e-5
    feature_batch_size: int = 32         # backbone forward batch (no effect on results)

    @field_validator("image_size", "flow_steps", "epochs", "batch_size", "feature_batch_size")
    @classmethod
    def _positive(cls, v):
        if v is not None and v <= 0:
            raise ValueError("must be positive")
        return v

    @field_validator("hidden_ratio", "clamp")
    @classmethod
    def _positive_float(cls, v):
        if v is not None and not v > 0:
            raise ValueError("must be positive")
        return v

    @field_validator("layers")
    @classmethod
    def _nonempty(cls, v):
        if v is not None and not v:
            raise ValueError("at least one layer")
        return v

    @model_validator(mode="after")
    def _known(self):
        spec_of_cheap(self.backbone)
        arch, _, in_name = self.backbone.partition(".")
        if in_name and self.pretrained_tag and in_name != self.pretrained_tag:
            raise ValueError(f"fastflow: backbone {self.backbone!r} names weights {in_name!r}, "
                             f"pretrained_tag says {self.pretrained_tag!r}")
        if self.pretrained_tag:
            import timm

            if not timm.list_pretrained(f"{arch}.{self.pretrained_tag}"):
                raise ValueError(f"fastflow: timm has no weights {arch}.{self.pretrained_tag}; tags: "
                                 f"{[n.partition('.')[2] for n in timm.list_pretrained(arch + '.*')]}")
        if preset_of(self.backbone) is None and self.layers is None:
            raise ValueError(f"fastflow: no paper setting for transformer backbone {self.backbone!r} "
                             f"(known: {sorted(PRESETS)}); give `layers: [blocks.N]`")
        return self


@register("fastflow")
class FastFlow(Method):
    Params = FastFlowParams
    protocols = {"one_class", "unified"}
    paper = ("Yu et al., FastFlow: Unsupervised Anomaly Detection and Localization via 2D Normalizing Flows, "
             "arXiv:2111.07677")
    reference = ("gathierry/FastFlow@2cf1f2f4c562a7f13cfb1959e3afe5df2f2d2565: fastflow.py, constants.py, "
                 "main.py, dataset.py, configs/*.yaml, requirements.txt (timm==0.5.4)")

    def __init__(self, params: FastFlowParams, ctx):
        super().__init__(params, ctx)
        # a transformer outside PRESETS (validated to name its layers) gets the transformer settings
        preset = preset_of(params.backbone) or dict(image_size=224, flow_steps=20, hidden_ratio=0.16,
                                                    conv3x3_only=False, layers=params.layers)

        def pick(name):
            value = getattr(params, name)
            return preset[name] if value is None else value

        self.image_size: int = pick("image_size")
        self.layers: list[str] = list(pick("layers"))
        self.flow_steps: int = pick("flow_steps")
        self.hidden_ratio: float = pick("hidden_ratio")
        self.conv3x3_only: bool = pick("conv3x3_only")
        self.pretrained_tag, self.feature_backbone = weights_of(params)
        self.timm_weights = params.pretrained and not params.weights
        self.spec = spec_of(self.feature_backbone)
        self.transformer = self.spec.architecture.startswith(TRANSFORMER_PREFIXES)
        self.transform = Transform(resize=self.image_size, crop=None, channels=3,
                                   mean=self.spec.mean, std=self.spec.std)
        self.net: FastFlowNet | None = None
        self.shapes: list[tuple[int, int, int]] | None = None
        self.n_batches: int | None = None

    # -- features
    def _stage_features(self, split: Split) -> list[torch.Tensor]:
        """Per-stage N×C×h×w CPU tensors (through the shared frozen-feature cache)."""
        p = self.params
        raw = extract_features(split, self.ctx, backbone=self.feature_backbone, layers=self.layers,
                               transform=self.transform, pretrained=p.pretrained, weights=p.weights,
                               batch_size=p.feature_batch_size)
        feats = [raw[layer] for layer in self.layers]
        if self.transformer:
            feats = [self._tokens_to_map(f) for f in feats]
        return feats

    @torch.no_grad()
    def _tokens_to_map(self, tokens: torch.Tensor) -> torch.Tensor:
        """Transformer block output N×L×C -> the backbone's final (frozen) LayerNorm, prefix
        (class / distillation) tokens dropped -> N×C×h×w (reference ``forward`` for DeiT / CaiT)."""
        import timm

        p, device = self.params, self.ctx.device
        model = get_backbone(self.feature_backbone, p.pretrained, p.weights, device).model  # loaded for the features
        prefix = getattr(model, "num_prefix_tokens", 0) \
            if isinstance(model, timm.models.vision_transformer.VisionTransformer) else 0
        n, length, c = tokens.shape
        side = int(round(math.sqrt(length - prefix)))
        if side * side != length - prefix:
            raise ValueError(f"fastflow: {length - prefix} patch tokens do not form a square grid")
        out = torch.empty(n, c, side, side)
        for s in range(0, n, 256):
            x = model.norm(tokens[s:s + 256].to(device).float())[:, prefix:]
            out[s:s + 256] = x.permute(0, 2, 1).reshape(-1, c, side, side).cpu()
        return out

    # -- training
    def fit(self, train: Split) -> None:
        p, ctx = self.params, self.ctx
        feats = self._stage_features(train)
        self.shapes = [tuple(int(v) for v in f.shape[1:]) for f in feats]
        self.net = FastFlowNet(self.shapes, layer_norm=not self.transformer, flow_steps=self.flow_steps,
                               hidden_ratio=self.hidden_ratio, conv3x3_only=self.conv3x3_only,
                               clamp=p.clamp).to(ctx.device)
        opt = adam(self.net.parameters(), p.lr, p.weight_decay)
        n = len(train)
        bs = min(p.batch_size, n)
        self.n_batches = n // bs  # drop_last=True (reference loader); at least one batch
        g = torch.Generator().manual_seed(ctx.seed)
        self.net.train()
        for epoch in range(1, p.epochs + 1):
            order = torch.randperm(n, generator=g)
            total = 0.0
            for b in range(self.n_batches):
                idx = order[b * bs:(b + 1) * bs]
                zs, lds = self.net([f[idx].to(ctx.device) for f in feats])
                loss = fastflow_loss(zs, lds)
                check_finite(loss.item(), epoch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item()
            ctx.log_epoch(epoch, total / self.n_batches)
        self.net.eval()

    # -- inference
    @torch.no_grad()
    def score(self, test: Split) -> Scores:
        if self.net is None:
            raise RuntimeError("score() before fit()")
        feats = self._stage_features(test)
        self.net.eval()
        maps = np.empty((len(test), self.image_size, self.image_size), np.float32)
        bs = self.params.batch_size
        for s in range(0, len(test), bs):
            zs, _ = self.net([f[s:s + bs].to(self.ctx.device) for f in feats])
            maps[s:s + bs] = anomaly_map(zs, self.image_size).cpu().numpy()
        image = maps.reshape(len(maps), -1).max(axis=1).astype(np.float64)
        return Scores(image=image, pixel=maps)

    def resolved_params(self) -> dict:
        p = self.params
        out = p.model_dump(mode="json")
        out.update(image_size=self.image_size, layers=self.layers, flow_steps=self.flow_steps,
                   hidden_ratio=self.hidden_ratio, conv3x3_only=self.conv3x3_only,
                   pretrained_tag=self.pretrained_tag if self.timm_weights else None,
                   timm_model=self.spec.timm_name if self.timm_weights else self.spec.architecture,
                   weights_source=(f"timm {self.spec.timm_name}" if self.timm_weights
                                   else "file (weights_sha256)" if p.weights else "random init"),
                   checkpoint=CHECKPOINT,
                   transform=self.transform.describe(), input_size=self.transform.size,
                   feature_shapes=[list(s) for s in self.shapes] if self.shapes else None,
                   feature_norm="frozen backbone final LayerNorm" if self.transformer
                   else "trainable LayerNorm over (C, H, W) per stage",
                   optimizer="Adam", batches_per_epoch=self.n_batches, drop_last=True,
                   loss="sum over stages of batch-mean(0.5*||z||^2 - log|det J|)",
                   anomaly_map="mean over stages of -exp(-0.5*mean_C(z^2)), bilinear to input",
                   image_score="max", image_score_rule="max of the anomaly map",
                   flow="FrEIA SequenceINN of AllInOneBlock (permute_soft=False), subnet conv-ReLU-conv, "
                        + ("3x3 only" if self.conv3x3_only else "3x3 / 1x1 alternating"))
        return out

    @classmethod
    def affinity_key(cls, params) -> tuple:
        if isinstance(params, dict):
            params = cls.Params(**params)
        preset = preset_of(params.backbone) or {}
        size = params.image_size or preset.get("image_size", 224)
        return ("features", weights_of(params)[1], weights_tag(params), size, None)
