"""Plain-PyTorch versions of the baseline generators, the baselines of bench_methods.py.

Each runs the same algorithm as its ``ue_fast.methods`` generator, written the way
research code usually is: float32 throughout, images and perturbations on the host
and copied per batch, the loss read back (a host sync) every step for logging, the
projection as separate tensor ops, per-sample or per-class Python loops where
research code has them (class-wise gradient sums, REM's per-sample augmentation and
one adversary per augmentation draw), and per-pixel loops for the training-free
methods (OPS's search, LSP's patches, AR's recurrence). Randomness is drawn
differently from ue_fast's, so results agree in distribution, not bit for bit; the
training-free ones are checked for exact agreement where the draws can be shared
(``ops_search_plain``, ``ar_process_plain``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ue_fast.methods.ap import shift_flip


def _project(delta, data, eps):
    delta = torch.clamp(delta, -eps, eps)
    return torch.clamp(data + delta, 0, 1) - data


def train_on_poisoned(model, opt, images, labels, poison, *, device, batch_size, gen, max_batches=None,
                      input_fn=None):
    """A surrogate epoch (or ``max_batches`` batches) of cross-entropy on x + poison, poison [N, ...]
    per sample on the host; ``input_fn(model, x, y)`` transforms the batch first (REM)."""
    model.train()
    for b, idx in enumerate(torch.randperm(len(images), generator=gen).split(batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        if len(idx) < 2:
            continue
        x = images[idx].to(device) + poison[idx].to(device)
        y = labels[idx].to(device)
        if input_fn is not None:
            x = input_fn(model, x, y)
        _, logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()


# ---------------------------------------------------------------------------------- EM
def em_round(model, opt, images, labels, poison, *, device, eps, alpha, steps, train_steps, batch_size,
             poison_batch_size, gen, classwise=False):
    """One EM round: ``train_steps`` surrogate batches, a PGD pass minimising CE, the stop check.

    images [N, 3, H, W] float in [0, 1] on the host; poison [N, ...] (or [C, ...] class-wise)
    on the host, updated and returned with the surrogate's accuracy on x + poison.
    """
    per_sample = torch.stack([poison[int(y)] for y in labels]) if classwise else poison
    train_on_poisoned(model, opt, images, labels, per_sample, device=device, batch_size=batch_size, gen=gen,
                      max_batches=train_steps)
    model.eval()
    model.requires_grad_(False)
    for idx in torch.randperm(len(images), generator=gen).split(poison_batch_size):
        data, y = images[idx].to(device), labels[idx].to(device)
        if classwise:
            for _ in range(steps):
                delta = torch.stack([poison[int(c)] for c in y]).to(device).requires_grad_(True)
                loss = F.cross_entropy(model(data + delta)[1], y)  # no pixel clip: delta is shared
                loss.backward()
                grad = torch.zeros_like(poison)
                for i, c in enumerate(y.tolist()):  # the class's gradient: a sum over its samples
                    grad[c] += delta.grad[i].cpu()
                poison = torch.clamp(poison - alpha * grad.sign(), -eps, eps)
                loss.item()
        else:
            delta = poison[idx].to(device)
            for _ in range(steps):
                delta.requires_grad_(True)
                loss = F.cross_entropy(model(data + delta)[1], y)
                loss.backward()
                delta = _project(delta.detach() - alpha * delta.grad.sign(), data, eps)
                loss.item()
            poison[idx] = delta.cpu()
    model.requires_grad_(True)
    correct = 0
    with torch.no_grad():
        for idx in torch.arange(len(images)).split(poison_batch_size):
            d = torch.stack([poison[int(c)] for c in labels[idx]]) if classwise else poison[idx]
            x = torch.clamp(images[idx] + d, 0, 1).to(device)
            correct += (model(x)[1].argmax(1).cpu() == labels[idx]).sum().item()
    return poison, correct / len(images)


# ----------------------------------------------------------------------------- AP / TAP
def ap_round(model, images, labels, poison, *, device, eps, alpha, steps, poison_batch_size, gen,
             num_classes=10, targeted=False, max_shift=4.0):
    """AP's attack on a frozen surrogate: per batch ``steps`` PGD steps on CE through a fresh
    differentiable shift + flip, ascending (``ap``) or descending towards (y + 1) mod C (``tap``)."""
    model.eval()
    model.requires_grad_(False)
    for idx in torch.randperm(len(images), generator=gen).split(poison_batch_size):
        data, y = images[idx].to(device), labels[idx].to(device)
        target = (y + 1) % num_classes if targeted else y
        delta = poison[idx].to(device)
        for _ in range(steps):
            delta.requires_grad_(True)
            u = torch.rand(len(idx), 3, generator=gen)
            loss = F.cross_entropy(model(shift_flip(data + delta, u, max_shift))[1], target)
            loss.backward()
            step = alpha * delta.grad.sign()
            delta = _project(delta.detach() + (-step if targeted else step), data, eps)
            loss.item()
        poison[idx] = delta.cpu()
    model.requires_grad_(True)
    return poison


# --------------------------------------------------------------------------------- REM
def _crop_flip_loop(x, padding, gen):
    """Per sample, in a Python loop: a random flip, then a random crop of the zero-padded image."""
    out = []
    for img in x:
        if torch.rand(1, generator=gen).item() < 0.5:
            img = img.flip(-1)
        img = F.pad(img, (padding,) * 4)
        i, j = torch.randint(0, 2 * padding + 1, (2,), generator=gen).tolist()
        out.append(img[:, i:i + x.shape[2], j:j + x.shape[3]])
    return torch.stack(out)


def _adversary(model, x, y, *, eps, alpha, steps, gen):
    was_training = model.training
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    x = x.detach()
    rho = ((torch.rand(x.shape, generator=gen) * 2 - 1) * eps).to(x.device)
    rho = torch.clamp(x + rho, 0, 1) - x
    for _ in range(steps):
        rho.requires_grad_(True)
        loss = F.cross_entropy(model(x + rho)[1], y)
        loss.backward()
        rho = _project(rho.detach() + alpha * rho.grad.sign(), x, eps)
    model.train(was_training)
    for p, f in zip(model.parameters(), flags):
        p.requires_grad_(f)
    return rho.detach()


def rem_round(model, opt, images, labels, poison, *, device, eps, alpha, steps, batch_size, poison_batch_size,
              gen, adv_eps, adv_alpha, adv_steps, eot_samples, padding=4):
    """One REM round: an adversarial-training epoch on T(x + delta) + rho, then per batch ``steps``
    PGD steps descending CE averaged over ``eot_samples`` draws of T, each with its own adversary."""
    def train_input(m, x, y):
        xd = _crop_flip_loop(torch.clamp(x, 0, 1), padding, gen)
        return xd + _adversary(m, xd, y, eps=adv_eps, alpha=adv_alpha, steps=adv_steps, gen=gen)

    train_on_poisoned(model, opt, images, labels, poison, device=device, batch_size=batch_size, gen=gen,
                      input_fn=train_input)
    model.eval()
    model.requires_grad_(False)
    for idx in torch.randperm(len(images), generator=gen).split(poison_batch_size):
        data, y = images[idx].to(device), labels[idx].to(device)
        delta = poison[idx].to(device)
        for _ in range(steps):
            delta.requires_grad_(True)
            for _ in range(eot_samples):  # gradients accumulate over the draws
                view = _crop_flip_loop(torch.clamp(data + delta, 0, 1), padding, gen)
                rho = _adversary(model, view, y, eps=adv_eps, alpha=adv_alpha, steps=adv_steps, gen=gen)
                loss = F.cross_entropy(model(view + rho)[1], y) / eot_samples
                loss.backward()
                loss.item()
            delta = _project(delta.detach() - alpha * delta.grad.sign(), data, eps)
        poison[idx] = delta.cpu()
    model.requires_grad_(True)
    return poison


# ------------------------------------------------------------------------------- Bayes
def bayes_error_plain(features, labels, num_classes, sigma=0.3):
    """The authors' formulation: features / max|f|, torch.cdist, exp kernel with the diagonal
    zeroed, ``+1e-8`` in the denominator, one-hot posterior, autograd through it all."""
    f = features / features.abs().max()
    k = torch.exp(-torch.cdist(f, f).pow(2) / (2 * sigma ** 2)) * (1 - torch.eye(len(f), device=f.device))
    w = k / (k.sum(1, keepdim=True) + 1e-8)
    p = w @ F.one_hot(labels, num_classes).float()
    return (1 - p.max(1).values).mean()


def bayes_round(model, opt, images, labels, poison, *, device, eps, alpha, steps, batch_size, poison_batch_size,
                gen, num_classes=10, sigma=0.3):
    """One Bayes round: a surrogate epoch on x + delta, then a PGD pass ascending the batch's Bayes error."""
    train_on_poisoned(model, opt, images, labels, poison, device=device, batch_size=batch_size, gen=gen)
    model.eval()
    model.requires_grad_(False)
    for idx in torch.randperm(len(images), generator=gen).split(poison_batch_size):
        if len(idx) < 2:
            continue
        data, y = images[idx].to(device), labels[idx].to(device)
        delta = poison[idx].to(device)
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = bayes_error_plain(model(data + delta)[0], y, num_classes, sigma)
            loss.backward()
            delta = _project(delta.detach() + alpha * delta.grad.sign(), data, eps)
            loss.item()
        poison[idx] = delta.cpu()
    model.requires_grad_(True)
    return poison


# --------------------------------------------------------------------- training-free
COLOURS = [(r, g, b) for r in (0, 1) for g in (0, 1) for b in (0, 1)]


def ops_search_plain(images, labels, num_classes):
    """OPS's search pixel by pixel: per class, position and colour, mean / std of |v - x| over
    the class's images and channels (population std); a (position, colour) taken is barred."""
    x = images.float() / 255
    _, _, h, w = x.shape
    taken, pos, col = set(), [], []
    for k in range(num_classes):
        xs = x[labels == k]
        best, arg = -math.inf, None
        for i in range(h):
            for j in range(w):
                for v, colour in enumerate(COLOURS):
                    if (i * w + j, v) in taken:
                        continue
                    d = (xs[:, :, i, j] - torch.tensor(colour, dtype=torch.float32)).abs()
                    score = (d.mean() / d.std(unbiased=False).clamp_min(1e-12)).item()
                    if score > best:
                        best, arg = score, (i * w + j, v)
        taken.add(arg)
        pos.append(arg[0])
        col.append(COLOURS[arg[1]])
    return torch.tensor(pos), torch.tensor(col, dtype=torch.float32)


def ops_plain(images, labels, num_classes):
    pos, col = ops_search_plain(images, labels, num_classes)
    x = images.float() / 255
    delta = torch.zeros_like(x)
    w = x.shape[3]
    for n in range(len(x)):
        p, c = int(pos[labels[n]]), col[labels[n]]
        delta[n, :, p // w, p % w] = c - x[n, :, p // w, p % w]
    return delta


def lsp_plain(labels, num_classes, *, size=32, patch=8, class_sep=10.0, rms=6 / 255, gen=None):
    """LSP per image and patch: class centres at random hypercube vertices plus unit Gaussian
    noise, each coordinate filling one patch, the image scaled to L2 norm rms * sqrt(3 H W)."""
    g = size // patch
    dim = 3 * g * g
    centres = (torch.randint(0, 2, (num_classes, dim), generator=gen).float() * 2 - 1) * class_sep
    out = torch.zeros(len(labels), 3, size, size)
    for n, y in enumerate(labels.tolist()):
        feat = centres[y] + torch.randn(dim, generator=gen)
        for c in range(3):
            for a in range(g):
                for b in range(g):
                    out[n, c, a * patch:(a + 1) * patch, b * patch:(b + 1) * patch] = feat[(c * g + a) * g + b]
        out[n] = out[n] / out[n].norm() * rms * math.sqrt(3 * size * size)
    return out


def ar_process_plain(weights, start):
    """The AR recurrence pixel by pixel: weights [N, 3, 8] (the 8 causal neighbours in a 3 x 3
    window, row-major), start [N, 3, H, W] (rows/columns >= 2 overwritten)."""
    x = start.clone()
    n, c, h, w = x.shape
    kernels = torch.cat([weights, torch.zeros(n, c, 1)], dim=2).view(n, c, 3, 3)  # the pixel itself: 0
    for k in range(n):
        for ch in range(c):
            for i in range(2, h):
                for j in range(2, w):
                    x[k, ch, i, j] = (x[k, ch, i - 2:i + 1, j - 2:j + 1] * kernels[k, ch]).sum()
    return x


def ar_plain(labels, class_weights, *, size=32, l2=1.0, gen=None):
    """AR perturbations of L2 norm ``l2``: the class's process on an (H + 4)^2 Gaussian start, cropped."""
    start = torch.randn(len(labels), 3, size + 4, size + 4, generator=gen)
    x = ar_process_plain(class_weights[labels], start)[:, :, 4:, 4:]
    return x / x.flatten(1).norm(dim=1)[:, None, None, None] * l2


# -------------------------------------------------------------------------------- CUDA
def cuda_plain(images, labels, filters):
    """CUDA image by image, as the authors' script: each image's channels convolved with its
    class's filter (zero padding), divided by the image's maximum, floored to 8 bits; the
    difference to the clean image in [0, 1] units. filters [C, k, k]."""
    x = images.float() / 255
    out = torch.empty_like(x)
    k = filters.shape[-1]
    for n in range(len(x)):
        w = filters[labels[n]].expand(3, 1, k, k)
        y = F.conv2d(x[n:n + 1], w, padding=k // 2, groups=3)[0]
        if y.max() > 0:
            y = y / y.max()
        out[n] = torch.floor(y * 255) / 255
    return out - x


# --------------------------------------------------------------------- HYPO / AAP / PIL
def frozen_attack(model, images, labels, poison, *, device, eps, alpha, steps, poison_batch_size, gen,
                  loss_fn, descend, augment=None):
    """A per-batch PGD pass against a frozen model, the shape of HYPO's, AAP's and PIL's attacks:
    ``steps`` sign steps on ``loss_fn(model, x, delta, y)`` (``augment(x + delta)`` is the
    caller's business inside it), descending or ascending, projected after each."""
    model.eval()
    model.requires_grad_(False)
    for idx in torch.randperm(len(images), generator=gen).split(poison_batch_size):
        data, y = images[idx].to(device), labels[idx].to(device)
        delta = poison[idx].to(device)
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = loss_fn(model, data, delta, y)
            loss.backward()
            step = alpha * delta.grad.sign()
            delta = _project(delta.detach() + (-step if descend else step), data, eps)
            loss.item()
        poison[idx] = delta.cpu()
    model.requires_grad_(True)
    return poison


def pil_loss(lmd=0.9):
    """PIL's loss for delta = -noise: lmd CE(f(noise), y) + (1 - lmd) KL(uniform || softmax(f(x - noise)))."""
    def loss(model, x, delta, y):
        ce = F.cross_entropy(model(-delta)[1], y)
        logp = F.log_softmax(model(x + delta)[1], dim=1)
        u = torch.full_like(logp, 1.0 / logp.shape[1])
        return lmd * ce + (1 - lmd) * F.kl_div(logp, u, reduction="batchmean")
    return loss


# --------------------------------------------------------------------------------- SEP
def sep_round(models, images, labels, poison, *, device, eps, alpha, steps, poison_batch_size, gen,
              num_classes=10, vr_steps=16):
    """SEP-FA-VR as their ens_feature_svre.py: the members a list of models, run one by one;
    class centroids per member over the clean set; per step every member's gradient, then
    ``vr_steps`` inner steps on randomly drawn members."""
    for m in models:
        m.eval()
        m.requires_grad_(False)
    with torch.no_grad():
        cents = []
        for m in models:
            feats = torch.cat([m(images[idx].to(device))[0] for idx in torch.arange(len(images)).split(512)])
            cents.append(torch.stack([feats[labels == c].mean(0) for c in range(num_classes)]))

    def grad_of(k, x, target):
        x = x.clone().requires_grad_(True)
        loss = F.mse_loss(models[k](x)[0], cents[k][target])
        loss.backward()
        loss.item()
        return x.grad

    for idx in torch.randperm(len(images), generator=gen).split(poison_batch_size):
        data, y = images[idx].to(device), labels[idx].to(device)
        target = (y + num_classes // 2) % num_classes
        delta = poison[idx].to(device)
        for _ in range(steps):
            gs = [grad_of(k, data + delta, target) for k in range(len(models))]
            g = sum(gs) / len(gs)
            s, inner = torch.zeros_like(g), delta.clone()
            for _ in range(vr_steps):
                k = int(torch.randint(len(models), (1,), generator=gen))
                s = s + grad_of(k, data + inner, target) - (gs[k] - g)
                inner = _project(inner - alpha * s.sign(), data, eps)
            delta = _project(delta - alpha * s.sign(), data, eps)
        poison[idx] = delta.cpu()
    return poison
