"""The worked examples: LeNet on the digits, ResNet-18 converted."""

import torch

import fastconv
from fastconv.examples import digits, resnet


def test_digits_data_ship_with_sklearn_and_split_stratified():
    (x_train, y_train), (x_test, y_test) = digits.load()
    assert x_train.shape[1:] == (1, 8, 8) and len(x_train) + len(x_test) == 1797
    assert torch.bincount(y_test).min() >= 40  # every class in the test set
    assert abs(x_train.mean().item()) < 1e-5 and abs(x_train.std().item() - 1) < 1e-5


def test_lenet_on_digits_reaches_95_percent_beside_torch():
    ours, theirs = digits.train()
    assert ours.accuracy[-1] >= 0.95, ours.accuracy
    # Same weights and batches, but training amplifies rounding differences (fastconv's
    # Winograd and depthwise kernels round differently from oneDNN): close, not equal.
    assert abs(ours.accuracy[-1] - theirs.accuracy[-1]) <= 0.02
    assert all(s > 0 for s in ours.seconds + theirs.seconds)


def test_lenet_first_step_matches_torch():
    """Before training compounds anything: the same loss and gradients as torch.nn."""
    import copy

    (x, y), _ = digits.load()
    torch.manual_seed(0)
    reference = digits.lenet()
    ours = fastconv.convert(copy.deepcopy(reference))
    losses = []
    for model in (ours, reference):
        loss = torch.nn.functional.cross_entropy(model(x[:32]), y[:32])
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-5 * losses[1]
    for p, q in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_resnet18_converts_matches_and_trains():
    r = resnet.convert_and_check(batch=2, size=32)
    assert r["swapped"] == 21  # 20 convolutions and the stem's max pool
    assert r["max_diff"] <= 1e-4 * max(1.0, r["scale"])
    assert r["loss_after"] < r["loss_before"]


def test_resnet18_has_the_published_parameter_count():
    # 11,689,512 for 1000 classes (He et al.; torchvision's resnet18).
    assert sum(p.numel() for p in resnet.ResNet18().parameters()) == 11_689_512
    model = fastconv.convert(resnet.ResNet18(10)).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
