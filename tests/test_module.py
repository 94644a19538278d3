"""FusedLoRAEnsembleLinear: init, from_linear, merged members, state_dict, layouts."""

import io

import pytest
import torch
from torch import nn

from lora_ensemble import FusedLoRAEnsembleLinear, replicate_members, to_member_fastest, to_member_major
from lora_ensemble.reference import lora_ensemble_reference


def _randomise(layer: FusedLoRAEnsembleLinear) -> None:
    with torch.no_grad():
        layer.lora_B.normal_()


def test_init_follows_the_paper():
    layer = FusedLoRAEnsembleLinear(20, 12, num_members=4, rank=3)
    assert layer.lora_B.abs().sum() == 0 and layer.lora_A.abs().sum() > 0
    bound = 10.0 * (6.0 / (20 + 3)) ** 0.5  # Xavier-uniform, gain 10
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.5 * bound
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert layer.scaling == 1.0 and FusedLoRAEnsembleLinear(4, 4, 2, 4, alpha=8).scaling == 2.0
    # B = 0: every member is W0
    x = torch.randn(8, 5, 20)
    base = nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x), base)


def test_from_linear_shares_and_freezes():
    linear = nn.Linear(10, 7)
    layer = FusedLoRAEnsembleLinear.from_linear(linear, num_members=3, rank=2, alpha=4)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not linear.weight.requires_grad
    assert layer.lora_A.shape == (3, 2, 10) and layer.lora_B.shape == (3, 7, 2) and layer.scaling == 2.0
    _randomise(layer)
    x = torch.randn(6, 10)
    ref = lora_ensemble_reference(x, linear.weight, linear.bias, layer.lora_A, layer.lora_B, 2.0)
    torch.testing.assert_close(layer(x).double(), ref, atol=1e-5, rtol=1e-5)


def test_merged_member_equals_its_rows():
    layer = FusedLoRAEnsembleLinear(9, 5, num_members=3, rank=2, alpha=1.0)
    _randomise(layer)
    x = torch.randn(3 * 4, 9)
    y = layer(x).view(3, 4, 5)
    for n in range(3):
        merged = layer.merged_member(n)
        assert type(merged) is nn.Linear
        torch.testing.assert_close(merged(x.view(3, 4, 9)[n]), y[n], atol=1e-5, rtol=1e-5)


class _Doubled(nn.Module):
    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return 2 * t


@pytest.mark.parametrize("name", ["weight", "bias", "lora_A", "lora_B"])
def test_parametrized_tensors_are_read_through_their_attributes(name):
    """The forward reads registered Parameters straight from ``_parameters`` (a hot path); a tensor
    that torch.nn.utils.parametrize computes still comes from the attribute."""
    from torch.nn.utils import parametrize

    layer = FusedLoRAEnsembleLinear(7, 5, num_members=2, rank=3, alpha=3.0, backend="torch")
    _randomise(layer)
    x = torch.randn(2 * 3, 7)
    parametrize.register_parametrization(layer, name, _Doubled())
    ref = lora_ensemble_reference(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    torch.testing.assert_close(layer(x).double(), ref, atol=1e-5, rtol=1e-5)


def test_no_bias_is_read_through_its_attribute():
    """A missing bias is a plain ``None`` attribute, not a registered Parameter."""
    layer = FusedLoRAEnsembleLinear(7, 5, num_members=2, rank=3, bias=False, backend="torch")
    _randomise(layer)
    x = torch.randn(2 * 3, 7)
    ref = lora_ensemble_reference(x, layer.weight, None, layer.lora_A, layer.lora_B, layer.scaling)
    torch.testing.assert_close(layer(x).double(), ref, atol=1e-5, rtol=1e-5)


def test_shared_input_module_attribute_and_override():
    layer = FusedLoRAEnsembleLinear(6, 4, num_members=2, rank=1, shared_input=True)
    _randomise(layer)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), layer(x.repeat(2, 1), shared_input=False))


def test_state_dict_round_trip():
    layer = FusedLoRAEnsembleLinear(8, 6, num_members=2, rank=3, alpha=6)
    _randomise(layer)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = FusedLoRAEnsembleLinear(8, 6, num_members=2, rank=3, alpha=6)
    fresh.load_state_dict(torch.load(buf))
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    x = torch.randn(4, 8)
    torch.testing.assert_close(fresh(x), layer(x))


def test_extra_repr():
    text = repr(FusedLoRAEnsembleLinear(8, 6, num_members=2, rank=3, backend="torch"))
    for word in ("in_features=8", "out_features=6", "num_members=2", "rank=3", "backend='torch'"):
        assert word in text


def test_only_lora_parameters_train():
    layer = FusedLoRAEnsembleLinear(8, 6, num_members=2, rank=3)
    layer(torch.randn(4, 3, 8)).square().sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


@pytest.mark.parametrize("lead", [(), (5,), (2, 3)])
def test_layout_conversions(lead):
    n, b = 3, 4
    member_major = torch.arange(n * b).repeat_interleave(int(torch.tensor(lead).prod())).reshape(n * b, *lead)
    fastest = to_member_fastest(member_major, n)
    # paper order: row b*N + n belongs to member n
    torch.testing.assert_close(fastest.reshape(b, n, -1)[:, :, 0], member_major.reshape(n, b, -1)[:, :, 0].T)
    torch.testing.assert_close(to_member_major(fastest, n), member_major)
    x = torch.randn(b, *lead)
    torch.testing.assert_close(to_member_major(x.repeat_interleave(n, 0), n), replicate_members(x, n))
    with pytest.raises(ValueError, match="divisible by num_members=5"):
        to_member_major(member_major, 5)
