"""The released ProGrad step, as BeierZhu/Prompt-align writes it: `ProGradLoss`
(`ProGrad.public/trainers/prograd.py`) and `prograd_backward_and_update`
(`Dassl.ProGrad.pytorch/dassl/engine/trainer.py`), on a fastprompt model's CoOp context, with
the zero-shot CLIP of `CLIP.forward` (encode_image / encode_text of the template, normalised,
`logit_scale.exp()`). Only the optimiser step is left out: the gradients it would take are returned."""

import torch
import torch.nn.functional as F


class ProGradLoss:
    def __init__(self, T):
        self.T = T

    def __call__(self, stu_logits, tea_logits, label):
        xe_loss = F.cross_entropy(stu_logits, label)
        tea_prob = F.softmax(tea_logits / self.T, dim=-1)
        kl_loss = -tea_prob * F.log_softmax(stu_logits / self.T, -1) * self.T * self.T
        kl_loss = kl_loss.sum(1).mean()
        return xe_loss, kl_loss


def zs_clip_logits(model, images):
    """ProGrad's `CLIP.forward`: zero-shot logits from the template's text features."""
    clip = model.clip
    with torch.no_grad():
        tokens = model.bundle.tokenizer([model.templates[0].format(c) for c in model.classnames])  # (K, 77)
        text_features = clip.encode_text(tokens)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        image_features = clip.encode_image(images)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        return clip.logit_scale.exp() * image_features @ text_features.t()


def prograd_backward(params, loss_a, loss_b, lambda_=1):
    """`prograd_backward_and_update` without the optimiser step: the gradients it writes, and
    whether each tensor's was projected."""
    for p in params:
        p.grad = None
    loss_b.backward(retain_graph=True)
    b_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    loss_a.backward()
    projected = []
    for p, b_grad in zip(params, b_grads):
        b_grad_norm = b_grad / torch.linalg.norm(b_grad)
        a_grad = p.grad.clone()
        a_grad_norm = a_grad / torch.linalg.norm(a_grad)
        conflict = bool(torch.dot(a_grad_norm.flatten(), b_grad_norm.flatten()) < 0)
        if conflict:
            p.grad = a_grad - lambda_ * torch.dot(a_grad.flatten(), b_grad_norm.flatten()) * b_grad_norm
        projected.append(conflict)
    return [p.grad.clone() for p in params], projected


def released_step(model, images, labels, T, lambda_):
    """(xe, kl, gradients, projected) of one released step on `model`'s context; the student is
    `CustomCLIP.forward` (our reference forward of the same prompts)."""
    params = [p for p in model.parameters() if p.requires_grad]
    output = model(images)
    xe, kl = ProGradLoss(T)(output, zs_clip_logits(model, images).detach(), labels)
    grads, projected = prograd_backward(params, xe, kl, lambda_)
    return xe.detach(), kl.detach(), grads, projected
