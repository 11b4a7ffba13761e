"""The released PromptSRC step, as muzairkhattak/PromptSRC writes it: `VLPromptLearner.__init__`'s
`fixed_embeddings`, `CustomCLIP.forward` in training mode, the losses of
`PromptSRC.forward_backward` (PREC fp32's branch) and GPA (`build_model`'s `self.gauss`,
`state_dict_weighting`, `state_dict_add`), on a fastprompt model's CLIP weights and prompt
tensors. The prompted towers are tests/_maple.py's re-implementation of the same repository's
`clip/model.py` (IVLP); the frozen towers are the plain CLIP's (`load_clip_to_cpu(cfg, True)`:
depth 0, no prompts). Only the optimiser step is left out: the gradients it would take are returned."""

import copy

import numpy as np
import torch
import torch.nn.functional as F

import _maple

# trainers/imagenet_templates.py IMAGENET_TEMPLATES (the 60 of the text target; not IMAGENET_TEMPLATES_SELECT)
IMAGENET_TEMPLATES = [
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
]


@torch.no_grad()
def fixed_embeddings(clip, tokenizer, classnames):
    """`VLPromptLearner.__init__`: `clip_model_temp.encode_text` of every template, stacked [K, 60, D]
    and meaned over the templates: *not* normalised (`CustomCLIP.forward` normalises it). The
    templates' rows run through `encode_text` in one call (each row's features are its own)."""
    classnames = [name.replace("_", " ") for name in classnames]
    x_tokenized = torch.cat([tokenizer([single_template.replace("{}", name)]) for single_template in IMAGENET_TEMPLATES
                             for name in classnames])  # (60·K, 77)
    text_features = clip.encode_text(x_tokenized).view(len(IMAGENET_TEMPLATES), len(classnames), -1)  # (60, K, D)
    all_teacher_features = [f.unsqueeze(1) for f in text_features]  # 60 x (K, 1, D)
    return torch.cat(all_teacher_features, dim=1).mean(dim=1)


def released_step(model, images, labels, text_loss_weight=25.0, image_loss_weight=10.0, fixed=None):
    """(loss, {prompt name: gradient}) of `forward_backward` on `model`'s CLIP and prompts:
    `CustomCLIP.forward(image, label)` in training, then L_SCL_text, L_SCL_image, L_SCL_logits.
    fixed: `fixed_embeddings` of the model's CLIP and classes, when the caller has them."""
    clip = model.clip
    ctx = model.text.context.detach().clone().requires_grad_(True)  # (M, w): VLPromptLearner.ctx
    deep_text = model.text.deep_context.detach().clone().requires_grad_(True)  # (J-1, M, w): text VPT_shallow
    visual = model.visual.prompts.detach().clone().requires_grad_(True)  # (N, P, d): VPT, then VPT_shallow
    _, prefix, suffix, tokenized = _maple.prompt_learner(clip, model.bundle.tokenizer, model.classnames,
                                                         ctx.shape[0], "a photo of a")
    logit_scale = clip.logit_scale.exp()
    prompts = torch.cat([prefix, ctx.unsqueeze(0).expand(len(model.classnames), -1, -1), suffix], dim=1)
    text_features = _maple.text_features(clip, prompts, tokenized, list(deep_text))
    image_features = _maple.image_features(clip.visual, images, visual[0], list(visual[1:]))
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    logits = logit_scale * image_features @ text_features.t()
    fixed = fixed_embeddings(clip, model.bundle.tokenizer, model.classnames) if fixed is None else fixed
    fixed = fixed / fixed.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        zero_shot_features = _maple.image_features(clip.visual, images, None, [])  # ZS_image_encoder: no prompts
        zero_shot_features = zero_shot_features / zero_shot_features.norm(dim=-1, keepdim=True)
        zero_shot_logits = logit_scale * zero_shot_features @ fixed.t()
    loss_ce = F.cross_entropy(logits, labels)
    loss_scl_text = F.l1_loss(text_features, fixed, reduction="mean") * text_loss_weight
    loss_scl_image = F.l1_loss(image_features, zero_shot_features, reduction="mean") * image_loss_weight
    L_SCL_logits = F.kl_div(
        F.log_softmax(logits / 1, dim=1),
        F.log_softmax(zero_shot_logits / 1, dim=1),
        reduction="sum",
        log_target=True,
    ) * (1 * 1) / logits.numel()
    L_SCL = L_SCL_logits + loss_scl_text + loss_scl_image
    loss = loss_ce + L_SCL
    grads = torch.autograd.grad(loss, [ctx, deep_text, visual])
    return loss.detach(), dict(zip(("text.context", "text.deep_context", "visual.prompts"), grads))


def get_gauss(mu, sigma):
    gauss = lambda x: (1 / (sigma * np.sqrt(2 * np.pi))) * np.exp(-0.5 * ((x - mu) / sigma) ** 2)  # noqa: E731
    return gauss


def gpa_weights(max_epoch, mean, stdev):
    """`build_model`: `self.gauss` over epochs 1..MAX_EPOCH, divided by its sum."""
    gauss = get_gauss(mean, stdev)
    weights = np.array([gauss(a) for a in range(1, max_epoch + 1)])
    return weights / sum(weights)


def gpa(states, weights):
    """`forward_backward`'s GPA over the state dicts of epochs 1..N (each after its last step):
    `state_dict_weighting` then `state_dict_add(weighted, previous)`."""
    previous = None
    for step_counter, state in enumerate(states, start=2):
        current_epoch_weight = weights[step_counter - 2]
        weighted = copy.deepcopy(state)
        for key in state:
            weighted[key] = state[key] * current_epoch_weight
        if previous is None:
            previous = weighted
        else:
            for key in weighted:
                previous[key] = previous[key] + weighted[key]
    return previous
