"""examples/sr_kit/models.py: generator loading, BasicSR's VGG-style D and perceptual loss, torch's EMA, weights."""

from __future__ import annotations

import warnings

import pytest
import torch
from examples_helpers import one_thread  # noqa: F401  (examples/ on sys.path; autouse fixture)
from safetensors.torch import save_file
from sr_kit import models as M

from sed_discriminator.weights import UntrustedFileError


def test_generator_weights_load_from_wrapped_files_and_check_the_scale(tmp_path):
    g = M.build_generator(num_feat=8, num_blocks=1, scale=4)
    torch.save({"params_ema": g.state_dict()}, tmp_path / "g.pth")  # BasicSR-style wrapper
    loaded = M.load_generator_weights(tmp_path / "g.pth", scale=4, trust_pickle=True)  # the test made it
    x = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(loaded(x), g(x))
    with pytest.raises(ValueError, match=r"x4 model but --scale is 2; pass --scale 4"):
        M.load_generator_weights(tmp_path / "g.pth", scale=2, trust_pickle=True)
    with pytest.raises(FileNotFoundError, match="No weight file at .*missing.pth"):
        M.load_generator_weights(tmp_path / "missing.pth")
    save_file({"conv.weight": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a generator checkpoint spandrel recognises"):
        M.load_generator_weights(tmp_path / "other.safetensors")


def test_generator_weights_follow_the_trust_rule(tmp_path, old_torch):
    g = M.build_generator(num_feat=8, num_blocks=1, scale=4)
    torch.save(g.state_dict(), tmp_path / "g.pth")
    with pytest.raises(UntrustedFileError, match=r"g\.pth'.*torch 2\.5\.1.*On this command line: add --trust-pickle"):
        M.load_generator_weights(tmp_path / "g.pth")
    with warnings.catch_warnings():  # torch.jit is deprecated; such archives are still out there
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, 3, 1)), tmp_path / "g.pt")  # spandrel would run its code
    with pytest.raises(UntrustedFileError, match=r"g\.pt'.*TorchScript"):
        M.load_generator_weights(tmp_path / "g.pt")
    save_file(g.state_dict(), tmp_path / "g.safetensors")  # no code in it: read on every torch
    assert M.load_generator_weights(tmp_path / "g.safetensors", scale=4).state_dict().keys() == g.state_dict().keys()


def test_perceptual_loss_is_basicsrs_on_our_vgg19_features():
    features, is_random = M.load_vgg19_features("random")
    assert is_random
    loss = M.perceptual_loss(features)
    hr = torch.rand(2, 3, 32, 32)
    assert loss(hr, hr)[0].item() == 0.0
    taps = loss.vgg(hr)
    assert set(taps) == set(M.PAPER_LAYER_WEIGHTS) and all((t < 0).any() for t in taps.values())  # before the ReLU
    assert loss.vgg.vgg_net.conv1_1.weight.data_ptr() == features[0].weight.data_ptr()  # our weights, not a download
    # The paper's weighted L1 of the features, computed here from torchvision's layers directly.
    sr = torch.rand(2, 3, 32, 32, requires_grad=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    index = {"conv1_2": 2, "conv2_2": 7, "conv3_4": 16, "conv4_4": 25, "conv5_4": 34}
    expected, a, b = 0.0, (sr - mean) / std, (hr - mean) / std
    relu_free = [torch.nn.ReLU() if isinstance(m, torch.nn.ReLU) else m for m in features]
    for i, layer in enumerate(relu_free[:35]):
        a, b = layer(a), layer(b)
        name = next((k for k, v in index.items() if v == i), None)
        expected = expected + (M.PAPER_LAYER_WEIGHTS[name] * (a - b).abs().mean() if name else 0.0)
    torch.testing.assert_close(loss(sr, hr)[0], expected)
    loss(sr, hr)[0].backward()
    assert sr.grad is not None and all(p.grad is None for p in loss.parameters())


def test_random_vgg_weights_are_the_same_every_time():
    a, _ = M.load_vgg19_features("random")
    torch.manual_seed(123)
    b, _ = M.load_vgg19_features("random")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_unavailable_vgg_weights_raise_with_the_fix(tmp_path):
    with pytest.raises(M.WeightsUnavailable, match=r"(?s)vgg19-dcbb9e9d\.pth.*--allow-random-weights"):
        M.load_vgg19_features(str(tmp_path / "nope.pth"))


def test_ema_is_torchs_averaged_model():
    model = torch.nn.Linear(2, 2)
    ema = M.make_ema(model, decay=0.5)
    ema.update_parameters(model)  # the first update copies
    before = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update_parameters(model)
    torch.testing.assert_close(ema.module.weight, before + 0.5)
    clone = M.make_ema(model, decay=0.9)
    clone.load_state_dict(ema.state_dict())
    assert torch.equal(clone.module.weight, ema.module.weight) and clone.n_averaged == 2
    with pytest.raises(ValueError, match="decay"):
        M.make_ema(model, decay=1.0)


def test_discriminator_factory():
    from sed_discriminator import ConditionedSeD, SeD

    plain = M.build_discriminator("pixel", width=8)
    assert isinstance(plain, SeD) and not plain.semantic_fusion
    assert plain(torch.rand(1, 3, 32, 32)).shape == (1, 1, 32, 32)
    with pytest.raises(ValueError, match="needs a semantic extractor"):
        M.build_discriminator("sed-patch", width=8)
    with pytest.raises(ValueError, match="choose one of"):
        M.build_discriminator("stylegan", width=8)
    assert issubclass(ConditionedSeD, SeD)


def test_esrgan_init_scales_only_the_residual_dense_blocks():
    g = M.build_generator(num_feat=16, num_blocks=2, scale=4)
    dense = {id(c) for b in g.modules() if type(b).__name__.startswith("ResidualDenseBlock") for c in b.modules()}
    convs = [m for m in g.modules() if isinstance(m, torch.nn.Conv2d)]
    inside = [c for c in convs if id(c) in dense]
    outside = [c for c in convs if id(c) not in dense]
    assert len(inside) == 2 * 3 * 5 and outside  # 2 RRDBs x 3 dense blocks x 5 convs; main path untouched
    assert all(c.bias.abs().max() == 0 for c in inside)
    assert max(c.weight.std().item() for c in inside) < 0.5 * min(c.weight.std().item() for c in outside)
