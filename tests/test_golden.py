"""Golden outputs of the authors' SeD code: this library must reproduce them from the same weights.

``data/golden.safetensors`` holds what the authors' public implementation (``SeD_P(3)`` and
``SeD_U()``, paper defaults, float32 on CPU) computed from deterministic weights;
``data/keys.json`` is the state-dict layout of that code (names and shapes in its order, with the
``module.`` prefix of its DDP training and the legacy spectral-norm keys). No code of the authors'
is here: :func:`official_state_dict` rebuilds the weights from the seeded rule they were made with.

Tensors in the file:

- ``x_eval``, ``s_eval`` -> ``<variant>_eval``: one eval-mode forward;
- ``x_train``, ``s_train`` -> ``<variant>_train``: ONE training-mode forward from the loaded state
  (one spectral-norm power iteration per normalised conv); ``<variant>_train_grad_x``: the gradient
  of ``mean(output ** 2)`` with respect to ``x_train``; ``<variant>_train_sn_u/<conv>.weight_u``:
  each conv's ``u`` vector after that forward.

Agreement is measured relative to each reference tensor's largest magnitude; 1e-5 is the bound (the
authors' code differs from itself on another CPU by about 1e-6). Gradients are compared with the
model in float64: in float32 another rounding order (channels_last, another kernel) can flip a
LeakyReLU input lying within rounding of zero, which moves the gradient of its whole receptive field
by about 1e-3 relative; that is a property of float32 arithmetic, not a difference of the networks.
The reference architecture is described in docs/reference.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sed_discriminator import SeD, load_official_weights

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

DATA = Path(__file__).resolve().parent / "data"
VARIANTS = ("patch", "pixel")
TOLERANCE = 1e-5
LAYOUTS = pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(DATA / "golden.safetensors"))


def official_state_dict(variant: str) -> dict[str, torch.Tensor]:
    """The authors'-layout state dict the golden outputs were computed from.

    The rule: the i-th entry of the variant's key list is drawn as a standard normal tensor from a
    generator seeded with ``1000 * variant_index + i`` (patch 0, pixel 1). A legacy spectral-norm
    vector is that draw divided by its L2 norm; the weight of a GroupNorm / LayerNorm (a key that
    contains ``norm`` and ends in ``.weight``) is ``1 + 0.1 * draw``; every other tensor is
    ``0.05 * draw``. Finally each ``u`` is refined by 5 power iterations on its conv's
    ``weight_orig`` flattened to (out, -1), ``v`` first then ``u`` (normalised with eps 1e-12),
    which sets both ``weight_u`` and ``weight_v``.
    """
    layout = json.loads((DATA / "keys.json").read_text(encoding="utf-8"))[variant]
    seed0 = 1000 * VARIANTS.index(variant)
    state: dict[str, torch.Tensor] = {}
    for i, (key, shape) in enumerate(layout):
        draw = torch.randn(shape, generator=torch.Generator().manual_seed(seed0 + i))
        leaf = key.rpartition(".")[2]
        if leaf in ("weight_u", "weight_v"):
            state[key] = draw / torch.linalg.vector_norm(draw)
        elif leaf == "weight" and "norm" in key:
            state[key] = 1 + 0.1 * draw
        else:
            state[key] = 0.05 * draw
    for key in [k for k in state if k.endswith(".weight_u")]:
        conv = key[: -len("weight_u")]
        matrix = state[conv + "weight_orig"].flatten(1)
        u = state[key]
        for _ in range(5):
            v = F.normalize(matrix.t() @ u, dim=0, eps=1e-12)
            u = F.normalize(matrix @ v, dim=0, eps=1e-12)
        state[conv + "weight_u"], state[conv + "weight_v"] = u, v
    return state


def loaded(variant: str, channels_last: bool, dtype: torch.dtype = torch.float32) -> SeD:
    model = load_official_weights(SeD(variant, channels_last=channels_last), official_state_dict(variant))
    return model.to(dtype)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != golden {tuple(expected.shape)}"
    scale = expected.abs().max().double()
    assert scale > 0, "a golden tensor is all zeros: the comparison would be meaningless"
    return ((actual.double() - expected.double()).abs().max() / scale).item()


def assert_matches(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    error = relative_error(actual.detach(), expected)
    assert error <= TOLERANCE, f"{name}: max error {error:.2e} of the largest magnitude (bound {TOLERANCE:.0e})"


def u_vectors(golden: dict[str, torch.Tensor], variant: str) -> dict[str, torch.Tensor]:
    """``{conv name: golden u}`` from keys ``<variant>_train_sn_u/<conv>.weight_u`` (legacy names)."""
    prefix, suffix = f"{variant}_train_sn_u/", ".weight_u"
    found = {k[len(prefix) : -len(suffix)]: v for k, v in golden.items() if k.startswith(prefix)}
    assert found and all(k.endswith(suffix) for k in golden if k.startswith(prefix))
    return found


def sn_u(model: SeD, conv: str) -> torch.Tensor:
    """A conv's power-iteration vector, the legacy ``<conv>.weight_u`` (``...parametrizations.weight.0._u`` here)."""
    return model.state_dict()[f"{conv}.parametrizations.weight.0._u"]


def test_weight_rule_fills_the_authors_layout() -> None:
    """The rebuilt weights have the layout's keys and shapes, converged SN vectors, and load strictly."""
    layout = json.loads((DATA / "keys.json").read_text(encoding="utf-8"))
    assert sorted(layout) == list(VARIANTS)
    for variant in VARIANTS:
        state = official_state_dict(variant)
        assert [(k, list(v.shape)) for k, v in state.items()] == [(k, list(s)) for k, s in layout[variant]]
        assert all(k.startswith("module.") for k in state)
        for key in (k for k in state if k.endswith(".weight_u")):
            conv = key[: -len("weight_u")]
            u, v, w = state[key], state[conv + "weight_v"], state[conv + "weight_orig"].flatten(1)
            torch.testing.assert_close(torch.linalg.vector_norm(u), torch.tensor(1.0))
            torch.testing.assert_close(F.normalize(w @ v, dim=0), u)  # u is the last step of the iteration
        model = loaded(variant, channels_last=False)
        assert set(model.state_dict()) == {
            k[len("module.") :]
            .replace("weight_orig", "parametrizations.weight.original")
            .replace("weight_u", "parametrizations.weight.0._u")
            .replace("weight_v", "parametrizations.weight.0._v")
            for k in state
        }


@pytest.mark.parametrize("variant", VARIANTS)
@LAYOUTS
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "math"])
def test_eval_outputs(golden: dict[str, torch.Tensor], variant: str, channels_last: bool, fused: bool) -> None:
    model = loaded(variant, channels_last).eval().set_fused_attn(fused)
    with torch.no_grad():
        out = model(golden["x_eval"], golden["s_eval"])
    assert_matches(f"{variant}_eval ({'fused' if fused else 'math'} attention)", out, golden[f"{variant}_eval"])
    # Eval mode never advances the power iteration: the loaded vectors are untouched.
    state = official_state_dict(variant)
    for conv in u_vectors(golden, variant):
        assert torch.equal(sn_u(model, conv), state[f"module.{conv}.weight_u"])


@pytest.mark.parametrize("variant", VARIANTS)
@LAYOUTS
def test_training_forward_outputs_and_spectral_norm(
    golden: dict[str, torch.Tensor], variant: str, channels_last: bool
) -> None:
    model = loaded(variant, channels_last).train()
    x = golden["x_train"].clone().requires_grad_()
    out = model(x, golden["s_train"])
    assert_matches(f"{variant}_train", out, golden[f"{variant}_train"])
    expected_u = u_vectors(golden, variant)
    sn_convs = {k.split(".parametrizations.")[0] for k in model.state_dict() if k.endswith("._u")}
    assert sn_convs == set(expected_u), "the spectral-normalised convs differ from the authors'"
    before = official_state_dict(variant)
    for conv, u in expected_u.items():
        assert_matches(f"{variant}_train_sn_u/{conv}", sn_u(model, conv), u)
        # The fixture's u vectors still move in one step, so matching them shows one iteration ran.
        assert relative_error(before[f"module.{conv}.weight_u"], u) > 10 * TOLERANCE
    # Input gradients are compared in float64 (test_input_gradients_in_float64), as the fixture's notes
    # say: in float32 a LeakyReLU input within rounding of zero can flip side under another kernel's
    # rounding order and move whole receptive fields of the gradient (seen: 1.3e-2 for the patch SeD).
    (out**2).mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.shape == golden[f"{variant}_train_grad_x"].shape


@pytest.mark.parametrize("variant", VARIANTS)
@LAYOUTS
def test_input_gradients_in_float64(golden: dict[str, torch.Tensor], variant: str, channels_last: bool) -> None:
    model = loaded(variant, channels_last, torch.float64).train()
    x = golden["x_train"].double().requires_grad_()
    out = model(x, golden["s_train"].double())
    assert out.dtype == torch.float64
    (out**2).mean().backward()
    assert_matches(f"{variant}_train (float64)", out, golden[f"{variant}_train"])
    assert_matches(f"{variant}_train_grad_x (float64)", x.grad, golden[f"{variant}_train_grad_x"])
    for conv, u in u_vectors(golden, variant).items():
        assert_matches(f"{variant}_train_sn_u/{conv} (float64)", sn_u(model, conv), u)
