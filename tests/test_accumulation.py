"""Gradient accumulation = one batch of all micro-batches, with the official loss normalisation (mask count of the
whole batch, clamped per GPU), also when the micro-batches hold very different numbers of masks."""

import pytest
import torch

from cascade_clip.accumulation import AccumulatedNormalizer
from cascade_clip.loss import loss_terms, normalized_loss, segmentation_loss


def _labels_with_pairs(classes_per_image, size=8, num_classes=5):
    """Labels whose images hold the given numbers of classes (stripes), the rest ignore."""
    labels = torch.full((len(classes_per_image), size, size), 255, dtype=torch.long)
    for b, count in enumerate(classes_per_image):
        for c in range(count):
            labels[b, c] = c
    return labels


@pytest.mark.parametrize("split", [[2, 2], [1, 3], [1, 1, 2]])
def test_accumulated_gradient_equals_the_whole_batch(split):
    torch.manual_seed(0)
    labels = _labels_with_pairs([1, 0, 5, 4])  # micro-batches of very different mask counts
    logits = torch.randn(4, 5, 8, 8, dtype=torch.float64, requires_grad=True)
    whole = segmentation_loss(logits, labels, backend="reference")
    (expected,) = torch.autograd.grad(whole["loss"], logits)

    normalizer = AccumulatedNormalizer()
    sums, first = torch.zeros(2, dtype=torch.float64), 0
    for size in split:
        part = slice(first, first + size)
        terms = loss_terms(logits[part], labels[part], backend="reference")
        divisor = normalizer.add(terms["masks"], [logits.grad])
        normalized_loss(terms, divisor)["loss"].backward()
        sums += torch.stack([100 * terms["focal"].detach(), terms["dice"].detach()])
        first += size
    torch.testing.assert_close(logits.grad, expected)
    # the loss of the accumulated step is the whole batch's loss
    torch.testing.assert_close((sums / normalizer.divisor).sum(), whole["loss"].detach())


def test_divisor_is_clamped_as_on_that_many_gpus():
    """k micro-batches act as k GPUs: the official per-GPU clamp max(N / G, 1) gives max(N / W, k)."""
    normalizer = AccumulatedNormalizer()
    assert float(normalizer.add(torch.tensor(0.0))) == 1.0
    assert float(normalizer.add(torch.tensor(1.0))) == 2.0  # one mask over two micro-batches: clamp at 2
    assert float(normalizer.add(torch.tensor(7.0))) == 8.0
    normalizer.reset()
    assert float(normalizer.add(torch.tensor(3.0))) == 3.0
