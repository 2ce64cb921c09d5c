"""GAP / CAM network (Zhou et al., "Learning Deep Features for Discriminative Localization",
CVPR 2016).

backbone -> optional 3x3 conv (the paper adds one, 1024 channels, before GAP for VGG/AlexNet/
GoogLeNet) -> global average pooling -> linear. The class activation map of class k is
``M_k(x, y) = sum_c w_kc f_c(x, y)``, so ``mean_xy M_k + b_k`` equals the logit of class k. The
maps of *all* classes come out of the forward pass as one batched contraction (no hooks).

Localisation follows the paper: upsample the map bilinearly to the image, keep pixels above 20%
of its maximum, take the largest connected component and its bounding box
(:func:`protozoo.maps.threshold_box`).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import metrics
from ..errors import UserError
from ..maps import threshold_box, upsample
from ..outputs import CAMEvidence, CAMOutput
from ..registry import register_model
from .base import ZooModel


@register_model("cam")
class CAMNet(ZooModel):
    report_writer = "protozoo.render.cam_report:write_cam_report"
    ground_truth_metrics = {"masks": ("pointing", "region_on_part", "relevance_mass", "cam_iou"),
                            "boxes": ("localization_accuracy",)}

    def __init__(self, backbone: str = "tiny_cnn", num_classes: int | None = None,
                 pretrained=False, stage: int = -1, extra_conv: int = 0,
                 class_names: list[str] | None = None):
        """
        Args:
            extra_conv: channels of the extra 3x3 conv + ReLU before GAP (Zhou et al. use 1024 on
                VGG); 0 (default) feeds the backbone's map to GAP directly.
        """
        super().__init__()
        bb = self._init_backbone(backbone, pretrained, stage, num_classes, class_names)
        channels = bb.channels
        self.extra = nn.Identity()
        if extra_conv:
            self.extra = nn.Sequential(nn.Conv2d(channels, extra_conv, 3, padding=1), nn.ReLU())
            channels = extra_conv
        self.fc = nn.Linear(channels, self.num_classes)

    def forward(self, x: torch.Tensor) -> CAMOutput:
        features = self.extra(self.backbone(x))
        logits = self.fc(features.mean(dim=(2, 3)))
        cams = torch.einsum("kc,bchw->bkhw", self.fc.weight.to(features.dtype), features)
        return CAMOutput(logits=logits, stride=self.stride, features=features, cams=cams)

    def intrinsic_map(self, output: CAMOutput, target: torch.Tensor) -> torch.Tensor:
        """The class activation map of class ``target[b]``, ``[B, h, w]``."""
        return output.cams[torch.arange(len(target), device=target.device), target]

    @torch.no_grad()
    def explain(self, x: torch.Tensor, classes=None, threshold: float = 0.2) -> CAMEvidence:
        """The evidence for images ``x`` ``[B, 3, H, W]`` as tensors, nothing rendered: every
        class's map upsampled bilinearly to the image (Zhou et al.'s step; ``maps[b, k]``) and
        the box of class ``classes[b]`` (default: the predicted class) by the paper's rule --
        pixels >= ``threshold`` x the map's maximum, largest connected component -- as the
        report and ``localization_accuracy`` draw it. Runs in eval mode (the model's mode is
        restored)."""
        out = self.eval_forward(x)
        logits = out.logits.float()
        chosen = logits.argmax(1) if classes is None else torch.as_tensor(
            classes, dtype=torch.long, device=logits.device).reshape(-1).expand(len(logits))
        if chosen.numel() and not 0 <= int(chosen.min()) <= int(chosen.max()) < self.num_classes:
            raise UserError(f"classes must lie in 0..{self.num_classes - 1}, got "
                            f"{chosen.tolist()}")
        maps = upsample(out.cams, tuple(x.shape[-2:]))
        boxes = torch.tensor([threshold_box(maps[b, int(k)].cpu().numpy(), threshold)
                              for b, k in enumerate(chosen.tolist())], dtype=torch.long)
        return CAMEvidence(logits=logits, classes=chosen, maps=maps,
                           boxes=boxes.reshape(-1, 4).to(logits.device))

    def explanation_metrics(self, output: CAMOutput, batch: dict) -> dict[str, torch.Tensor]:
        """Pointing, region on the part, relevance mass, ``cam_iou`` and ``localization_accuracy``
        for one batch, each beside its chance level (:func:`protozoo.metrics.cam_metrics`)."""
        preds = output.logits.argmax(1)
        return metrics.cam_metrics(output.cams.float(), batch["label"], preds,
                                   batch["image"].shape[-2:], batch.get("mask"), batch.get("box"))
