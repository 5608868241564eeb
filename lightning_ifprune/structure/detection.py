"""torchvision detection models: which layers define their outputs, and how they are traced.

A torchvision detector (Faster R-CNN and the other ``GeneralizedRCNN`` models, RetinaNet,
FCOS) computes losses in training mode, from targets, and detections in eval mode. Its
structure is therefore traced in **eval mode** on a list of images: what the graph sees is
the real inference path, from the images through backbone, FPN and heads to the boxes.

The layers whose output channels *are* the outputs — class logits, box deltas, centerness,
the RPN's objectness and box deltas, the box predictor — keep all their output channels:
their channels are laid out as anchors × classes (or × 4 box coordinates), so removing one
would change what the model predicts, not how. :func:`output_layers` names them; the
structure ignores them automatically and lists them in ``skipped``. Their *input* channels
(the channels of the shared head convs and the box head) stay prunable.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

#: Detector classes traced in eval mode.
DETECTORS = (GeneralizedRCNN, RetinaNet, FCOS)

#: Per detector class: output-defining layers, relative to the detector, and what they predict.
_OUTPUTS: tuple[tuple[type[nn.Module], dict[str, str]], ...] = (
    (RetinaNet, {"head.classification_head.cls_logits": "class logits per anchor",
                 "head.regression_head.bbox_reg": "box deltas per anchor"}),
    (FCOS, {"head.classification_head.cls_logits": "class logits per location",
            "head.regression_head.bbox_reg": "box distances per location",
            "head.regression_head.bbox_ctrness": "centerness per location"}),
    (GeneralizedRCNN, {"rpn.head.cls_logits": "RPN objectness per anchor",
                       "rpn.head.bbox_pred": "RPN box deltas per anchor",
                       "roi_heads.box_predictor": "class scores and box deltas per proposal",
                       "roi_heads.mask_predictor": "mask logits per class",
                       "roi_heads.keypoint_predictor": "keypoint logits"}),
)  # fmt: skip


def detectors(model: nn.Module) -> dict[str, nn.Module]:
    """Every torchvision detector inside ``model`` (itself included), by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, DETECTORS)}


def traces_in_eval(model: nn.Module) -> bool:
    """Whether ``model`` is traced in eval mode: it holds a torchvision detector."""
    return bool(detectors(model))


def output_layers(model: nn.Module) -> dict[str, str]:
    """Qualified names of the output-defining layers of every detector in ``model`` → why they stay."""
    modules = dict(model.named_modules())
    out: dict[str, str] = {}
    for prefix, detector in detectors(model).items():
        for cls, layers in _OUTPUTS:
            if not isinstance(detector, cls):
                continue
            for rel, what in layers.items():
                name = f"{prefix}.{rel}" if prefix else rel
                if name in modules:
                    out[name] = f"output layer of {type(detector).__name__} ({what}): its channels are outputs"
    return out
