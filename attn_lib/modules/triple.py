r"""Triple attention (A3Net): channel-wise, element-wise and scale-wise attention on DenseNet-121.

Wang, Wang, Qin, Zhang, Li, Xia, "Triple attention learning for classification of 14 thoracic
diseases using chest radiography", Medical Image Analysis 67 (2021) 101846.

A3Net classifies chest radiographs (ChestX-ray14, 14 diseases, multi-label) with an ImageNet
DenseNet-121 and three attention modules learned together: *channel-wise* attention emphasises
the discriminative channels of the feature maps, *element-wise* attention makes the model look at
the regions of the abnormalities, and *scale-wise* attention re-weights feature maps taken at
different depths (scales). It reports a mean per-class AUC of 0.826.

What is known and what is reconstructed
---------------------------------------
No code was released, and the full text was not available to us. What is certain comes from the
abstract (above) and from a public question that paraphrases the paper's Section 4.3:

* channel-wise attention is a squeeze-and-excitation block, giving channel-attended features
  X_CA (sigmoid gates);
* the element-wise part has an attention estimator f_att of three convolutions, 512 kernels 1x1,
  512 kernels 3x3 and K kernels 1x1 (K = number of classes) ending in a softmax, giving K
  attention maps A (the paper's Eq. 4); K linear classifiers, one 1x1 convolution with K kernels,
  applied to every position of X_CA give score maps S (Eq. 5); each score is multiplied by the
  corresponding attention value, and the resulting score vector is trained against the labels
  with a weighted cross-entropy.

Every one of those numbers is the *label attention* of the Spatial Regularization Network
(Zhu, Li, Ouyang, Yu, Wang, "Learning Spatial Regularization with Image-level Supervisions for
Multi-label Image Classification", CVPR 2017): the same f_att (512 1x1, 512 3x3, C 1x1, ReLU after
the first two), the same C linear classifiers as a 1x1 convolution, the same product pooled into a
score vector with its own loss. Where A3Net's own text is missing we therefore follow SRN; what
that decides, and what is our own choice, is listed below so that it can be revised when the paper
can be read.

1. **Softmax over space, not over classes** (reconstructed from SRN, which normalises each
   attention map by a spatial softmax). For class k, ``A_k(i, j) = exp(Z_k(i, j)) /
   sum_{i',j'} exp(Z_k(i', j'))``: each map is a distribution over the H*W positions. Only then
   is the pooled product an attention-weighted *average* of the class scores, and only then do
   the two readings of "A applied to X_CA" coincide: pooling the features with A_k and
   classifying, ``w_k . (sum_ij A_k(ij) X_CA(ij)) + b_k``, equals pooling the scores,
   ``sum_ij A_k(ij) S_k(ij)``, because the classifier is linear and ``sum_ij A_k(ij) = 1`` lets
   the bias through unchanged. A softmax over the K classes at every pixel (the Q&A's
   Keras layer does that: ``activation=softmax`` normalises the last, channel, axis) makes the
   classes compete for each pixel, forces every background pixel to give all its mass to some
   class, and makes the summed score grow with the image size.
2. **Sum pooling** of ``A * S`` over positions (SRN); with (1) it is the weighted average above.
3. **A side branch.** The score vector is an auxiliary output with its own cross-entropy; the
   attention maps do not gate the features that reach the final classifier. Nothing in the
   paraphrase sends A back into the trunk, SRN does not either, and a spatial softmax map cannot
   gate features without a rescaling that neither paper states (its values are about 1/(H*W)).
   The branch still changes the network: its loss trains X_CA, hence the SE gate and the
   backbone, to carry class evidence where the attention looks, and its maps A are class
   localisations obtained from image-level labels alone.
4. f_att has ReLU after its first two convolutions, biases, and no batch norm (SRN's
   description); the classifier convolution has a bias.
5. **Scale-wise attention** is reconstructed from the abstract's one sentence, in the shape of
   the select step of Selective Kernel networks (Li et al., CVPR 2019): see
   :class:`ScaleWiseAttention`. One weight per scale and per image, a softmax across the scales.
6. **Placement** (see :mod:`attn_lib.models.densenet`): channel-wise attention on the backbone's
   last feature map; element-wise attention on X_CA; scale-wise attention over the outputs of
   dense blocks 2 and 3 and X_CA, followed by global average pooling and the classifier.
7. **Loss.** The paper is multi-label: sigmoid outputs and a cross-entropy weighted per class
   against ChestX-ray14's imbalance. CIFAR is single-label with balanced classes, so both the
   classifier and the auxiliary score vector are trained with the softmax cross-entropy and
   uniform class weights: ``loss = CE(logits, y) + w * CE(aux, y)``, ``w = 1`` by default (the
   paper's weighting of the two terms is not known to us).

The question's answer, as a plug-in layer
-----------------------------------------
The element-wise part is not a layer that returns a feature map for the next layer; it is a
second classifier head on the same features, whose output gets its own loss::

    channel = ChannelWiseAttention(C)
    element = ElementWiseAttention(C, K)
    x_ca = channel(features)                    # [B, C, H, W]
    logits = head(x_ca)                         # the main classifier, [B, K]
    aux = element(x_ca)                         # the pooled score vector, [B, K]
    loss = F.cross_entropy(logits, y) + w * F.cross_entropy(aux, y)

The Q&A's attempt differs from this in ways worth naming: it applies the channel gate to the
attention estimator's output instead of estimating the attention from X_CA; it normalises over
the classes at each pixel; it passes the score maps through a sigmoid gate; it drops the 3x3
layer of f_att; and it feeds the product to a global max pool and the main classifier, so the
score vector never has a loss of its own.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn
import torch.nn.functional as F

from ._checks import check_feature_map, check_positive, reduced_channels
from .se import SqueezeExcitation

__all__ = ["ChannelWiseAttention", "ElementWiseAttention", "ScaleWiseAttention"]


def _softmax_float32(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax with its statistics in float32 (float64 stays float64), also under autocast."""
    return torch.softmax(logits, dim=dim, dtype=torch.promote_types(logits.dtype, torch.float32))


class ChannelWiseAttention(SqueezeExcitation):
    r"""A3Net's channel-wise attention: a squeeze-and-excitation gate, ``X_CA = X * s``.

    It *is* :class:`attn_lib.modules.se.SqueezeExcitation` (same arguments, same weights, same
    output); the class exists to name its role. In A3Net it gates the backbone's last feature map
    X (after DenseNet's final BN-ReLU), so that both the element-wise attention and the classifier
    read the channel-attended features X_CA:

    .. math::

        s = \sigma(W_2\, \delta(W_1\, \mathrm{GAP}(X) + b_1) + b_2) \in (0, 1)^C,
        \qquad X_{CA} = s \odot X

    Args:
        channels: ``C`` (1024 on DenseNet-121).
        reduction: ``r`` (16, SE's default; A3Net's value is not known to us).
        bias: biases in the two fully connected layers (``True``, as in SENet).

    Shapes: ``x`` and ``y``: ``[B, C, H, W]``; attention ``s``: ``[B, C, 1, 1]``, in (0, 1).
    """


class ElementWiseAttention(nn.Module):
    r"""A3Net's element-wise attention: K class attention maps pool K per-position class scores.

    For channel-attended features ``X = X_CA`` of shape ``[B, C, H, W]`` and K classes:

    .. math::

        Z &= f_{att}(X) = \mathrm{conv}^{1\times1}_{512 \to K}\,\delta\,
              \mathrm{conv}^{3\times3}_{512 \to 512}\,\delta\,
              \mathrm{conv}^{1\times1}_{C \to 512}(X)
              &&Z \in \mathbb{R}^{K \times H \times W}\\
        A_k(i, j) &= \frac{\exp Z_k(i, j)}{\sum_{i', j'} \exp Z_k(i', j')}
              &&\text{(Eq. 4; spatial softmax, } \textstyle\sum_{i,j} A_k(i, j) = 1)\\
        S_k(i, j) &= w_k^\top X(i, j) + b_k
              &&\text{(Eq. 5; K linear classifiers at every position)}\\
        \hat{y}_k &= \sum_{i, j} A_k(i, j)\, S_k(i, j)
              = w_k^\top \Big(\sum_{i,j} A_k(i, j)\, X(i, j)\Big) + b_k
              &&\text{(the score vector, } \hat{y} \in \mathbb{R}^K)

    The last identity is why the softmax runs over space: "attend to X with A_k, then classify"
    and "classify every position, then attend to the scores" are the same number. ``ŷ`` is
    trained as auxiliary logits with a cross-entropy (softmax over K on CIFAR; the paper's
    multi-label sigmoid on ChestX-ray14). See the module docstring for what is reconstructed.

    The module is a classifier head, not a gate: its output is the score vector. Placed on the
    channel-attended last feature map of the backbone, beside the main classifier.

    Choices: ReLU after the first two convolutions and none after the third; biases in all four
    convolutions; no batch norm (as described for SRN's f_att); PyTorch's default
    initialisation. The softmax is computed in float32 under autocast (float64 stays float64),
    so ``A`` and ``ŷ`` come out in float32 there.

    Args:
        channels: ``C``, channels of the input (1024 on DenseNet-121).
        num_classes: ``K``, the number of classes (attention maps, classifiers, scores).
        hidden: width of f_att's first two convolutions (512 in the paper; smaller for tests).

    Shapes:
        * ``x``: ``[B, C, H, W]``
        * output ``ŷ``: ``[B, K]``
        * attention (``return_attention=True``): ``{"element": A [B, K, H, W], "scores":
          S [B, K, H, W]}``, with ``A > 0``, ``A.sum((2, 3)) == 1`` and
          ``ŷ == (A * S).sum((2, 3))``.

    Parameters: ``512 C + 9 * 512^2 + 512 K + C K`` weights plus ``1024 + 2K`` biases
    (2,899,988 for C = 1024, K = 10).
    """

    def __init__(self, channels: int, num_classes: int, hidden: int = 512):
        super().__init__()
        name = type(self).__name__
        self.channels = check_positive(channels, "channels", name)
        self.num_classes = check_positive(num_classes, "num_classes", name)
        self.hidden = check_positive(hidden, "hidden", name)
        # f_att, the attention estimator.
        self.conv1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.conv2 = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(hidden, num_classes, kernel_size=1)
        # The K linear classifiers, one per class, shared by all positions.
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def attention_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``Z = f_att(x)`` before the softmax: ``[B, C, H, W] -> [B, K, H, W]``."""
        return self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> Union[torch.Tensor, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """``[B, C, H, W] -> ŷ [B, K]``; with ``return_attention=True`` also
        ``{"element": A, "scores": S}``, both ``[B, K, H, W]``."""
        check_feature_map(x, self.channels, type(self).__name__)
        logits = self.attention_logits(x)
        attention = _softmax_float32(logits.flatten(2), dim=-1).unflatten(2, logits.shape[2:])
        scores = self.classifier(x)
        score_vector = (attention * scores).sum(dim=(2, 3))
        if return_attention:
            return score_vector, {"element": attention, "scores": scores}
        return score_vector

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_classes={self.num_classes}, hidden={self.hidden}"


class ScaleWiseAttention(nn.Module):
    r"""Scale-wise attention (reconstructed): a softmax over depths weighs S feature maps.

    The paper's abstract says only that scale-wise attention "recalibrates the feature maps at
    different scales". We build it as the select step of a Selective Kernel unit whose branches
    are the outputs of several dense blocks, with one weight per scale (not per channel) so that
    the weights say which depth the image is classified from. For inputs
    ``X_s: [B, C_s, H_s, W_s]``, s = 1..S, the last one the deepest and smallest:

    .. math::

        U_s &= \delta(\mathcal{B}(\mathrm{conv}^{1\times1}_{C_s \to C}(
              \mathrm{AvgPool}_{H_s \times W_s \to h \times w}(X_s))))
              &&\text{(a common size: } [C, h, w] = \text{that of } X_S)\\
        z &= \delta\big(W_1\, \mathrm{GAP}(\textstyle\sum_s U_s) + b_1\big),
              \quad W_1 \in \mathbb{R}^{C/r \times C} &&\text{(fuse)}\\
        a &= \mathrm{softmax}_s(W_2 z + b_2), \quad W_2 \in \mathbb{R}^{S \times C/r}
              &&\text{(one weight per scale, } \textstyle\sum_s a_s = 1)\\
        Y &= \textstyle\sum_s a_s\, U_s &&Y \in \mathbb{R}^{C \times h \times w}

    Choices (all ours): pooling before the 1x1 projection (the two commute, as both are linear,
    and pooling first is cheaper; the BN then sees the pooled map); conv-BN-ReLU projections for
    every scale, so that all branches are normalised alike; ``W_2`` and ``b_2`` start at zero,
    so the module starts as the plain average of the projected scales (``a_s = 1/S``) and learns
    to depart from it. The softmax is computed in float32 under autocast.

    Where it sits: after the backbone, before global average pooling and the classifier; in
    :mod:`attn_lib.models.densenet` its inputs are the outputs of dense blocks 2 and 3 and the
    channel-attended last feature map.

    Args:
        channels: ``C``, the common width of the projected scales and of the output.
        in_channels: ``(C_1, ..., C_S)``, the widths of the S inputs, in the order they are given.
        reduction: ``r`` of the fuse layer (16, as SE and SK use).

    Shapes:
        * ``features``: a list of S tensors ``[B, C_s, H_s, W_s]`` with ``H_s >= h``, ``W_s >= w``
          where ``(h, w)`` is the size of the last one
        * output ``Y``: ``[B, C, h, w]``
        * attention (``return_attention=True``): ``a``, ``[B, S]``, rows summing to 1.
    """

    def __init__(self, channels: int, in_channels: Sequence[int], reduction: float = 16):
        super().__init__()
        name = type(self).__name__
        self.channels = check_positive(channels, "channels", name)
        if isinstance(in_channels, (str, bytes)) or not isinstance(in_channels, Sequence) or not in_channels:
            raise ValueError(f"{name}: expected in_channels to be a non-empty sequence of widths, got {in_channels!r}")
        self.in_channels = tuple(check_positive(c, "every entry of in_channels", name) for c in in_channels)
        self.num_scales = len(self.in_channels)
        self.hidden = reduced_channels(channels, reduction, name)
        self.reduction = reduction
        self.projections = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c, channels, kernel_size=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            )
            for c in self.in_channels
        )
        self.fc1 = nn.Linear(channels, self.hidden)
        self.fc2 = nn.Linear(self.hidden, self.num_scales)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(
        self, features: Sequence[torch.Tensor], return_attention: bool = False
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """S maps ``[B, C_s, H_s, W_s] -> [B, C, h, w]``; with ``return_attention=True`` also the
        scale weights ``a``, ``[B, S]``."""
        name = type(self).__name__
        if not isinstance(features, (list, tuple)) or len(features) != self.num_scales:
            got = f"{len(features)} items" if isinstance(features, (list, tuple)) else type(features).__name__
            raise ValueError(f"{name}: expected a list of {self.num_scales} feature maps, got {got}")
        for s, (x, c) in enumerate(zip(features, self.in_channels)):
            check_feature_map(x, c, f"{name} (scale {s})")
        size = tuple(features[-1].shape[2:])
        batch = features[-1].shape[0]
        for s, x in enumerate(features):
            if x.shape[0] != batch or x.shape[2] < size[0] or x.shape[3] < size[1]:
                raise ValueError(
                    f"{name} (scale {s}): expected batch {batch} and a spatial size of at least "
                    f"{list(size)} (the last scale's), got shape {list(x.shape)}"
                )
        projected = torch.stack(
            [proj(F.adaptive_avg_pool2d(x, size)) for proj, x in zip(self.projections, features)], dim=1
        )  # [B, S, C, h, w]
        z = F.relu(self.fc1(projected.sum(dim=1).mean(dim=(2, 3))))
        weights = _softmax_float32(self.fc2(z), dim=1)  # [B, S]
        y = (weights.to(projected.dtype)[:, :, None, None, None] * projected).sum(dim=1)
        return (y, weights) if return_attention else y

    def extra_repr(self) -> str:
        return f"channels={self.channels}, in_channels={self.in_channels}, reduction={self.reduction}"
