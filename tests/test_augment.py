"""On-device batch augmentation against torchvision and the reference code, draw by draw and in distribution."""
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torchvision import transforms as T1
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from pipeline.stage1.augment import (CIFAR10_POLICY, BatchAugment, apply_op, autoaugment, cutout, draw_autoaugment,
                                     draw_cutout, op_magnitude, pad_crop_flip, resized_crop, rrc_params)

CPU = torch.device("cpu")


def _images(b, h=32, w=32, seed=0):
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ---- AutoAugment ----------------------------------------------------------------------------------

def test_policy_is_torchvision_cifar10():
    assert CIFAR10_POLICY == v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)._policies
    assert len(CIFAR10_POLICY) == 25


def test_autoaugment_draw_frequencies_match_policy():
    n = 20000
    sub, applied, negated = draw_autoaugment(n, CPU, torch.Generator().manual_seed(1))
    counts = torch.bincount(sub, minlength=25).numpy()
    # sub-policies uniform: chi-square goodness of fit
    assert stats.chisquare(counts).pvalue > 1e-3
    for k, pol in enumerate(CIFAR10_POLICY):
        m = sub == k
        for j, (_, p, _) in enumerate(pol):
            rate = applied[m, j].float().mean().item()
            se = math.sqrt(max(p * (1 - p), 1e-4) / m.sum().item())
            assert abs(rate - p) < 5 * se + 1e-9, (k, j, rate, p)
    assert abs(negated.float().mean().item() - 0.5) < 0.01


def test_one_op_equals_torchvision_functional():
    x = _images(3)
    mag, signed = op_magnitude("Rotate", 2, 32, 32)
    assert signed and mag == pytest.approx(30 * 2 / 9)
    ref = torch.stack([TF.rotate(img, angle=-mag, interpolation=v2.InterpolationMode.NEAREST, fill=0) for img in x])
    assert torch.equal(apply_op(x, "Rotate", -mag), ref)
    mag, _ = op_magnitude("TranslateX", 9, 32, 32)
    ref = torch.stack([TF.affine(img, angle=0.0, translate=[int(mag), 0], scale=1.0, shear=[0.0, 0.0],
                                 interpolation=v2.InterpolationMode.NEAREST, fill=0) for img in x])
    assert torch.equal(apply_op(x, "TranslateX", mag), ref)
    ref = torch.stack([TF.adjust_contrast(img, 1.0 + op_magnitude("Contrast", 6, 32, 32)[0]) for img in x])
    assert torch.equal(apply_op(x, "Contrast", op_magnitude("Contrast", 6, 32, 32)[0]), ref)
    assert torch.equal(apply_op(x, "Posterize", op_magnitude("Posterize", 7, 32, 32)[0]),
                       TF.posterize(x, bits=int(op_magnitude("Posterize", 7, 32, 32)[0])))


def _reference_autoaugment(img, k, applied, negated):
    """torchvision's AutoAugment.forward for one image with the sub-policy / coin flips given."""
    for j, (op, _, bin_idx) in enumerate(CIFAR10_POLICY[k]):
        if not applied[j]:
            continue
        mag, signed = op_magnitude(op, bin_idx, 32, 32)
        img = apply_op(img[None], op, -mag if (signed and negated[j]) else mag)[0]
    return img


def test_batched_autoaugment_equals_per_image_reference():
    x = _images(300, seed=3)
    sub, applied, negated = draw_autoaugment(300, CPU, torch.Generator().manual_seed(2))
    assert len(torch.unique(sub)) >= 20  # a batch never applies one sub-policy to all images
    out = autoaugment(x, sub, applied, negated)
    changed = 0
    for i in range(300):
        ref = _reference_autoaugment(x[i], int(sub[i]), applied[i].tolist(), negated[i].tolist())
        assert torch.equal(out[i], ref), i
        changed += not torch.equal(out[i], x[i])
    assert changed > 150  # most images were transformed
    assert torch.equal(x, _images(300, seed=3))  # input untouched


# ---- Cutout ---------------------------------------------------------------------------------------

def _devries_cutout(img, y, x, length=16):
    """DeVries & Taylor's Cutout (as in the BALMS code) with the centre given, on a [C,H,W] array."""
    h, w = img.shape[1:]
    mask = np.ones((h, w), np.float32)
    y1, y2 = np.clip(y - length // 2, 0, h), np.clip(y + length // 2, 0, h)
    x1, x2 = np.clip(x - length // 2, 0, w), np.clip(x + length // 2, 0, w)
    mask[y1:y2, x1:x2] = 0.
    return img * mask


def test_cutout_matches_reference_box_size_and_fill():
    x = torch.full((4, 3, 32, 32), 200, dtype=torch.uint8)
    cy, cx = torch.tensor([16, 0, 31, 5]), torch.tensor([16, 0, 5, 31])
    out = cutout(x, cy, cx)
    assert [(out[i, 0] == 0).sum().item() for i in range(4)] == [256, 64, 9 * 13, 13 * 9]
    assert set(torch.unique(out).tolist()) == {0, 200}
    xs = _images(64, seed=5)
    cy, cx = draw_cutout(64, 32, 32, CPU, torch.Generator().manual_seed(0))
    out = cutout(xs, cy, cx)
    for i in range(64):
        ref = _devries_cutout(xs[i].numpy().astype(np.float32), int(cy[i]), int(cx[i]))
        np.testing.assert_array_equal(out[i].numpy().astype(np.float32), ref)
    assert 0 <= cy.min() and cy.max() <= 31 and len(torch.unique(cy)) > 20


def test_cifar_autoaug_pipeline_order():
    """crop/flip, then AutoAugment, then Cutout (black), then normalisation: with mean 0 / std 1/255 the output
    holds raw pixel values, and every image has a black Cutout box of the drawn size."""
    g = torch.Generator().manual_seed(0)
    aug = BatchAugment((0, 0, 0), (1 / 255,) * 3, CPU, "cifar-autoaug", generator=g)
    x = torch.full((256, 3, 32, 32), 77, dtype=torch.uint8)
    out = aug(x)
    g2 = torch.Generator().manual_seed(0)  # replay the draws in the documented order
    flip = torch.rand(256, generator=g2) < 0.5
    i, j = torch.randint(0, 9, (256,), generator=g2), torch.randint(0, 9, (256,), generator=g2)
    ref = pad_crop_flip(x, i, j, flip)
    ref = autoaugment(ref, *draw_autoaugment(256, CPU, g2))
    ref = cutout(ref, *draw_cutout(256, 32, 32, CPU, g2))
    torch.testing.assert_close(out, ref.float())


# ---- pad-crop-flip and random-resized-crop --------------------------------------------------------

def test_pad_crop_flip_offsets_and_flips():
    """Every one of the 81 offsets occurs and about half the images are flipped, read off the pixels."""
    n = 4000
    rows = torch.arange(1, 33).view(1, 32, 1).expand(32, 32, 32)   # channel 0 = row + 1 (0 = padding)
    cols = torch.arange(1, 33).view(1, 1, 32).expand(32, 32, 32)   # channel 1 = column + 1
    img = torch.stack([rows[0], cols[0], torch.zeros(32, 32, dtype=torch.long)]).to(torch.uint8)
    g = torch.Generator().manual_seed(0)
    aug = BatchAugment((0, 0, 0), (1 / 255,) * 3, CPU, "cifar", generator=g)
    out = aug(img.expand(n, 3, 32, 32).contiguous()).round().long()
    i = out[:, 0, 16, 16] - 1 - 12                      # output row 16 = padded row i + 16 = source row i + 12
    flipped = (out[:, 1, 16, 17] - out[:, 1, 16, 16]) < 0
    j = torch.where(flipped, out[:, 1, 16, 16] - 1 - 11, out[:, 1, 16, 16] - 1 - 12)
    assert set(zip(i.tolist(), j.tolist())) == {(a, b) for a in range(9) for b in range(9)}
    assert abs(flipped.float().mean().item() - 0.5) < 0.04
    # and each output is exactly that padded crop
    xp = torch.nn.functional.pad(img, (4, 4, 4, 4))
    for k in range(50):
        crop = xp[:, i[k]:i[k] + 32, j[k]:j[k] + 32]
        assert torch.equal(out[k].to(torch.uint8), crop.flip(2) if flipped[k] else crop)


@pytest.mark.parametrize("hw", [(32, 32), (20, 64)])
def test_rrc_params_match_torchvision_get_params(hw):
    h, w = hw
    n = 4000
    top, left, ch, cw = rrc_params(n, h, w, CPU, torch.Generator().manual_seed(0))
    assert (top >= 0).all() and (left >= 0).all() and (top + ch <= h).all() and (left + cw <= w).all()
    torch.manual_seed(0)
    img = torch.zeros(3, h, w)
    ref = np.array([T1.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])  # (i, j, h, w)
                    for _ in range(n)])
    ours = np.stack([top.numpy(), left.numpy(), ch.numpy(), cw.numpy()], 1)
    area = lambda a: a[:, 2] * a[:, 3] / (h * w)  # noqa: E731
    logr = lambda a: np.log(a[:, 3] / a[:, 2])  # noqa: E731
    assert stats.ks_2samp(area(ours), area(ref)).pvalue > 1e-3
    assert stats.ks_2samp(logr(ours), logr(ref)).pvalue > 1e-3
    # the centre-crop fallback happens equally often (never on a square image, often on 20x64)
    fallback = lambda a: np.mean((a[:, 0] == (h - a[:, 2]) // 2) & (a[:, 1] == (w - a[:, 3]) // 2)  # noqa: E731
                                 & (a[:, 2] * a[:, 3] >= 0.9 * h * w))
    assert abs(fallback(ours) - fallback(ref)) < 0.03


def test_resized_crop_is_the_box_resampled():
    """A crop box resized to its own size is exactly the box (flipped when asked); a smaller output is the box
    downsampled, not the whole image resized."""
    x = torch.rand(2, 3, 40, 40)
    top, left = torch.tensor([3, 10]), torch.tensor([5, 0])
    h, w = torch.tensor([16, 16]), torch.tensor([16, 16])
    flip = torch.tensor([False, True])
    out = resized_crop(x, top, left, h, w, flip, 16)
    torch.testing.assert_close(out[0], x[0, :, 3:19, 5:21])
    torch.testing.assert_close(out[1], x[1, :, 10:26, 0:16].flip(2))
    out8 = resized_crop(x, top, left, h, w, torch.tensor([False, False]), 8)
    torch.testing.assert_close(out8[0], torch.nn.functional.avg_pool2d(x[0:1, :, 3:19, 5:21], 2)[0])


def test_imagenet_kind_crops_random_boxes():
    g = torch.Generator().manual_seed(0)
    aug = BatchAugment((0, 0, 0), (1 / 255,) * 3, CPU, "imagenet", out_size=24, generator=g)
    x = _images(1, 48, 48).expand(64, 3, 48, 48).contiguous()
    out = aug(x)
    assert out.shape == (64, 3, 24, 24)
    # identical inputs, different random boxes: the outputs differ from each other and from a plain resize
    assert len({tuple(o.flatten()[:50].tolist()) for o in out}) > 60
    plain = torch.nn.functional.interpolate(x[:1].float(), size=24, mode="bilinear", align_corners=False)
    assert min((o - plain[0]).abs().mean().item() for o in out) > 0.5


# ---- host-side draws (issue 16, item 4) --------------------------------------------------------------

# sha256[:16] of three augmented batches (whole, rows 10:30 of 64, whole) and the generator's final state, with
# the per-group implementation of 87e718d (torch.unique/nonzero per group on the device): the host grouping
# must leave every CPU draw and pixel as it was (the in-flight runs resume on it).
AUG_DIGESTS = {"cifar": "a48fcc31e7acc307", "cifar-autoaug": "75e205cb6a92f8bd", "imagenet": "a0a03889ea956a7f"}


def _aug_digest(kind):
    import hashlib
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(123)
    aug = BatchAugment((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), CPU, kind, 24 if kind == "imagenet" else None, g)
    h = hashlib.sha256()
    for t in (aug(x), aug(x[10:30], rows=(10, 30, 64)), aug(x), g.get_state()):
        h.update(np.ascontiguousarray(t.numpy()).tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("kind", sorted(AUG_DIGESTS))
def test_cpu_draws_and_pixels_unchanged_by_host_grouping(kind):
    assert _aug_digest(kind) == AUG_DIGESTS[kind]


def test_autoaugment_groups_on_the_host(monkeypatch):
    """No torch.unique / nonzero (a device sync each on CUDA) while augmenting: the decisions are grouped in
    numpy and the row indices copied once."""
    def forbidden(*a, **k):
        raise AssertionError("device-side grouping")
    monkeypatch.setattr(torch, "unique", forbidden)
    monkeypatch.setattr(torch.Tensor, "unique", forbidden)
    monkeypatch.setattr(torch.Tensor, "nonzero", forbidden)
    monkeypatch.setattr(torch, "nonzero", forbidden)
    g = torch.Generator().manual_seed(5)
    out = BatchAugment((0.5,) * 3, (0.25,) * 3, CPU, "cifar-autoaug", None, g)(_images(32))
    assert out.shape == (32, 3, 32, 32)


def test_draws_follow_the_generator_device():
    from pipeline.stage1.augment import draw_device, to_device
    assert draw_device(None) == CPU and draw_device(torch.Generator()) == CPU
    t = torch.arange(3)
    assert to_device(t, "cpu") is t


def test_aa_fill_share_benchmark_matches_exact_expectation():
    """benchmarks/aa_fill_share.py (the README's "6.6% of training pixels") against the exact expectation:
    every sub-policy x applied/not x sign of its geometric ops, weighted by its probability, on one white image."""
    import itertools
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import aa_fill_share
    finally:
        sys.path.pop(0)
    share, reached = 0.0, {"Rotate": 0.0, "Shear": 0.0, "Translate": 0.0}
    for pol in CIFAR10_POLICY:
        ops = [(op, p, b) for op, p, b in pol]
        for app in itertools.product((True, False), repeat=2):
            for neg in itertools.product((False, True), repeat=2):
                w = 1 / 25
                x = torch.full((1, 1, 32, 32), 255, dtype=torch.uint8)
                for (op, p, b), a, ng in zip(ops, app, neg):
                    mag, signed = op_magnitude(op, b, 32, 32)
                    w *= (p if a else 1 - p) * (0.5 if signed else (1.0 if not ng else 0.0))
                    if a and op in aa_fill_share.GEOMETRIC:
                        x = apply_op(x, op, -mag if ng else mag)
                if w == 0:
                    continue
                share += w * (x == 0).float().mean().item()
                for name in reached:   # an image counts once per op kind, even if two of its ops are that kind
                    if any(a and op.startswith(name) for (op, _, _), a in zip(ops, app)):
                        reached[name] += w
    m = aa_fill_share.measure(20000, seed=0)
    assert abs(m["fill_share"] - share) < 0.005, (m["fill_share"], share)   # se ~0.001 at 20,000 draws
    for name, p in reached.items():
        assert abs(m["images_reached"][name] - p) < 4 * math.sqrt(p * (1 - p) / 20000), (name, m, reached)
    assert 0.05 < share < 0.08   # the README quotes 6.6%


# ---- BALMS's own AutoAugment (recipe balms) -------------------------------------------------------

def _smooth_images(b, seed=0):
    """Photo-like uint8 images [b,32,32,3]: bilinear 4x upsampling of random 8x8 ones (bicubic on white noise
    magnifies the kernel difference far beyond what a photo shows)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    return np.stack([np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
        (32, 32), Image.BILINEAR)) for _ in range(b)])


def _deepvoltaire(img, op, m):
    """DeepVoltaire's SubPolicy ops (the AutoAugment BALMS imports) on one HxWx3 array, magnitude signed."""
    from PIL import Image, ImageOps
    im, fc = Image.fromarray(img), (128, 128, 128)
    if op == "ShearX":
        out = im.transform(im.size, Image.AFFINE, (1, m, 0, 0, 1, 0), Image.BICUBIC, fillcolor=fc)
    elif op == "ShearY":
        out = im.transform(im.size, Image.AFFINE, (1, 0, 0, m, 1, 0), Image.BICUBIC, fillcolor=fc)
    elif op == "TranslateX":
        out = im.transform(im.size, Image.AFFINE, (1, 0, m * im.size[0], 0, 1, 0), fillcolor=fc)
    elif op == "TranslateY":
        out = im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, m * im.size[1]), fillcolor=fc)
    elif op == "Rotate":  # rotate_with_fill
        rot = im.convert("RGBA").rotate(m)
        out = Image.composite(rot, Image.new("RGBA", rot.size, (128,) * 4), rot).convert(im.mode)
    elif op == "Solarize":
        out = ImageOps.solarize(im, m)
    return np.asarray(out).astype(int)


DEEPVOLTAIRE_RANGES = {"ShearX": np.linspace(0, 0.3, 10), "ShearY": np.linspace(0, 0.3, 10),
                       "TranslateX": np.linspace(0, 150 / 331, 10), "TranslateY": np.linspace(0, 150 / 331, 10),
                       "Rotate": np.linspace(0, 30, 10), "Solarize": np.linspace(256, 0, 10)}


@pytest.mark.parametrize("op", sorted(DEEPVOLTAIRE_RANGES))
def test_balms_ops_match_deepvoltaire_pil(op):
    """Each op of `cifar-autoaug-balms` against DeepVoltaire's PIL code at every magnitude bin and sign:
    Translate and Solarize pixel for pixel; Rotate but for nearest-neighbour ties (< 0.2% of pixels); Shear
    bicubic with the grey fill on PIL's pixels (but for ties at the border) and the rest within 4 levels
    (grid_sample's cubic kernel has a = -0.75, PIL's -0.5)."""
    from pipeline.stage1.augment import apply_op_balms, balms_magnitude
    imgs = _smooth_images(12)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    for bin_idx in range(10):
        mag, signed = balms_magnitude(op, bin_idx, 32, 32)
        assert signed == (op not in ("Rotate", "Solarize"))  # Rotate: counter-clockwise only
        for sign in ((1, -1) if signed else (1,)):
            ref = np.stack([_deepvoltaire(i, op, sign * DEEPVOLTAIRE_RANGES[op][bin_idx]) for i in imgs])
            # torchvision translates by +t where PIL's affine offset is -t
            ours_mag = -sign * mag if op.startswith("Translate") else sign * mag
            ours = apply_op_balms(x, op, ours_mag).permute(0, 2, 3, 1).numpy().astype(int)
            fill_ours, fill_ref = (ours == 128).all(-1), (ref == 128).all(-1)
            if op.startswith("Shear"):
                assert (fill_ours != fill_ref).mean() < 0.002, (bin_idx, sign)
                if bin_idx:
                    assert fill_ref.sum() > 12 * (bin_idx + 1)  # the sheared-in corner is grey
                both = ~(fill_ours ^ fill_ref)
                assert np.abs(ours - ref)[both].max() <= 4 and np.abs(ours - ref).mean() < 1.0, (bin_idx, sign)
            elif op == "Rotate":
                assert (ours != ref).any(-1).mean() < 0.002, bin_idx
                assert fill_ref.sum() >= 12 * 4 * bin_idx  # the rotated-in corners are grey
            else:
                np.testing.assert_array_equal(ours, ref, err_msg=f"{op} bin {bin_idx} sign {sign}")


def test_balms_kind_makes_the_paper_draws_and_differs_only_in_its_ops():
    """`cifar-autoaug-balms` consumes the generator exactly as `cifar-autoaug` (same crops, sub-policies, coin
    flips, Cutout boxes), so the two kinds differ only in images that drew a geometric op or Solarize; a Rotate
    drawn negative turns counter-clockwise."""
    from pipeline.stage1.augment import BALMS_OPS, apply_op_balms, balms_magnitude
    x = _images(256, seed=4)
    outs, states = {}, {}
    for kind in ("cifar-autoaug", "cifar-autoaug-balms"):
        g = torch.Generator().manual_seed(9)
        outs[kind] = BatchAugment((0, 0, 0), (1 / 255,) * 3, CPU, kind, generator=g)(x)
        states[kind] = g.get_state()
    assert torch.equal(states["cifar-autoaug"], states["cifar-autoaug-balms"])
    g = torch.Generator().manual_seed(9)
    torch.rand(256, generator=g), torch.randint(0, 9, (256,), generator=g), torch.randint(0, 9, (256,), generator=g)
    sub, applied, negated = draw_autoaugment(256, CPU, g)
    other_op = torch.tensor([any(applied[i, j] and CIFAR10_POLICY[int(sub[i])][j][0] in BALMS_OPS
                                  for j in range(2)) for i in range(256)])
    differs = (outs["cifar-autoaug"] != outs["cifar-autoaug-balms"]).flatten(1).any(1)
    assert not differs[~other_op].any() and differs[other_op].float().mean() > 0.8
    # sub-policy 1 = (Rotate 0.7 bin 2, TranslateX 0.3 bin 9): negated Rotate alone, against the reference
    one = torch.tensor([1]), torch.tensor([[True, False]]), torch.tensor([[True, False]])
    mag, _ = balms_magnitude("Rotate", 2, 32, 32)
    assert torch.equal(autoaugment(x[:1], *one, balms=True), apply_op_balms(x[:1], "Rotate", mag))
    assert not torch.equal(autoaugment(x[:1], *one), apply_op_balms(x[:1], "Rotate", mag))
