"""fastconv.Conv2D as a drop-in for nn.Conv2d, and fastconv.convert."""

import inspect

import pytest
import torch
from torch import nn

import fastconv

CONFIGS = [
    dict(in_channels=3, out_channels=4, kernel_size=3),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=2, padding=(1, 2), bias=False),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding="same", dilation=2, groups=4),
    dict(in_channels=2, out_channels=4, kernel_size=1, groups=2),
    dict(in_channels=3, out_channels=5, kernel_size=(2, 3), padding="valid", stride=(1, 2)),
]
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


def test_constructor_signature_matches_nn_conv2d():
    assert inspect.signature(fastconv.Conv2D) == inspect.signature(nn.Conv2d)
    assert issubclass(fastconv.Conv2D, nn.Conv2d)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_same_init_state_dict_output_and_grads(config, padding_mode):
    if padding_mode != "zeros" and config.get("padding") in ("same", "valid", None):
        config = {**config, "padding": config.get("padding") if config.get("padding") else 1}
    torch.manual_seed(0)
    theirs = nn.Conv2d(**config, padding_mode=padding_mode)
    torch.manual_seed(0)
    ours = fastconv.Conv2D(**config, padding_mode=padding_mode)
    # Same initialisation from the same seed, same keys and shapes.
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    # load_state_dict both ways.
    ours.load_state_dict(nn.Conv2d(**config, padding_mode=padding_mode).state_dict())
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, config["in_channels"], 9, 8, dtype=torch.float64)
    ours.double(), theirs.double()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    torch.testing.assert_close(ya, yb)
    grad = torch.randn_like(yb)
    ya.backward(grad), yb.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad)
    for (name, pa), pb in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def test_factory_kwargs_and_repr():
    layer = fastconv.Conv2D(2, 3, 3, dtype=torch.float64, device="cpu")
    assert layer.weight.dtype == torch.float64 and layer.bias.dtype == torch.float64
    assert repr(layer).startswith("Conv2D(2, 3, kernel_size=(3, 3)")
    y = layer(torch.randn(2, 5, 5, dtype=torch.float64))  # unbatched
    assert y.shape == (3, 3, 3)


def test_convert_swaps_in_place_and_keeps_parameters():
    class Custom(nn.Conv2d):  # a user's subclass may mean something else: left alone
        pass

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect"),
                      nn.Conv2d(8, 4, 1)),
        Custom(4, 4, 1),
    )
    x = torch.randn(2, 3, 10, 10)
    expected = model(x)
    params = [id(p) for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert fastconv.convert(model) is model
    assert [type(m) for m in model.modules() if isinstance(m, nn.Conv2d)] == \
        [fastconv.Conv2D] * 3 + [Custom]
    assert [id(p) for p in model.parameters()] == params
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    # The optimizer built before the swap still trains the converted model.
    before = model[0].weight.detach().clone()
    loss = model(x).square().mean()
    loss.backward()
    optimizer.step()
    assert not torch.equal(model[0].weight, before)
    assert model(x).square().mean() < loss


def test_converted_model_trains_like_torch():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 1, 3))
    ours = fastconv.convert(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(),
                                          nn.Conv2d(4, 1, 3)).double())
    ours.load_state_dict(reference.double().state_dict())
    x, target = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randn(4, 1, 6, 6,
                                                                          dtype=torch.float64)
    for model in (reference, ours):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(5):
            opt.zero_grad()
            (model(x) - target).square().mean().backward()
            opt.step()
    for a, b in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)
