import pytest
import torch
from torch import nn

from noduledet.models import ATTENTIONS, build_attention
from noduledet.models.attention import CCAPM, CCASM, CoordAttention, SpatialChannel, eca_kernel_size

NAMES = sorted(ATTENTIONS)


def test_registry_has_the_issue_names():
    assert set(NAMES) == {"none", "se", "eca", "cbam", "coord", "channel", "ccapm", "ccasm"}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(2, 32, 8, 8), (2, 16, 5, 11)])  # square and non-square
def test_attention_keeps_shape(name, shape):
    x = torch.randn(*shape)
    assert build_attention(name, shape[1])(x).shape == x.shape


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown attention 'foo'; choose from \['cbam', 'ccapm'"):
        build_attention("foo", 16)


def test_bad_option_value_is_named():
    with pytest.raises(ValueError, match="combine='sum'"):
        build_attention("ccapm", 16, combine="sum")


def _copy_core(src: nn.Module, dst: nn.Module) -> None:
    dst.core.load_state_dict(src.core.state_dict())


@pytest.mark.parametrize("train", [False, True])
def test_ccapm_without_channel_embedding_is_coordinate_attention(train):
    coord = CoordAttention(32)
    ccapm = CCAPM(32, combine="mul", chan_embed="")
    _copy_core(coord, ccapm)
    coord.train(train), ccapm.train(train)
    x = torch.randn(2, 32, 7, 9)
    torch.testing.assert_close(ccapm(x), coord(x))
    assert ccapm.gate is None  # no unused parameters


def test_ccasm_with_unit_channel_gate_is_coordinate_attention():
    coord = CoordAttention(32).eval()
    ccasm = CCASM(32).eval()
    _copy_core(coord, ccasm)

    class Ones(nn.Module):
        def forward(self, x):
            return torch.ones(x.shape[0], x.shape[1], 1, 1)

    ccasm.gate = Ones()
    x = torch.randn(2, 32, 6, 10)
    torch.testing.assert_close(ccasm(x), coord(x))


def test_ccapm_matches_the_resolved_formula():
    """F * (ax + ay) with the channel weights on the W strip, computed by hand."""
    m = CCAPM(16).eval()
    x = torch.randn(1, 16, 4, 6)
    s = torch.sigmoid(m.gate.mlp(x.mean((2, 3), keepdim=True)) + m.gate.mlp(x.amax((2, 3), keepdim=True)))
    zx, zy = x.mean(3, keepdim=True), s * x.mean(2, keepdim=True)
    z = m.core.embed(torch.cat([zx, zy.transpose(2, 3)], dim=2))
    ax = torch.sigmoid(m.core.conv_x(z[:, :, :4]))
    ay = torch.sigmoid(m.core.conv_y(z[:, :, 4:].transpose(2, 3)))
    torch.testing.assert_close(m(x), x * (ax + ay))


def test_ccapm_xy_embedding_differs_from_y():
    a, b = CCAPM(16, chan_embed="y").eval(), CCAPM(16, chan_embed="xy").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 16, 5, 5)
    assert not torch.allclose(a(x), b(x))


@pytest.mark.parametrize(
    "channels,k", [(64, 3), (128, 5), (256, 5), (512, 5), (1024, 5), (2048, 7)]
)
def test_eca_kernel_sizes(channels, k):
    assert eca_kernel_size(channels) == k
    assert build_attention("eca", channels).conv.kernel_size == (k,)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "none"] + ["sc"])
def test_every_parameter_gets_a_gradient(name):
    m = SpatialChannel(16) if name == "sc" else build_attention(name, 16)
    x = torch.randn(2, 16, 6, 7)
    m(x).square().sum().backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname} got no gradient"


@pytest.mark.parametrize("name", NAMES)
def test_batch_of_one_trains(name):
    m = build_attention(name, 16).train()
    y = m(torch.randn(1, 16, 5, 5))
    assert torch.isfinite(y).all()


def test_one_convention_no_bias():
    for name in NAMES:
        for mod in build_attention(name, 64).modules():
            if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                assert mod.bias is None, name
