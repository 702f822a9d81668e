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


# --- the two forms of CCAPM and CCASM, pinned against plain hand-written references ---------

FORM_CASES = [("ccapm", "hou"), ("ccapm", "paper"), ("ccasm", "hou"), ("ccasm", "paper")]


def _w(conv: nn.Conv2d) -> torch.Tensor:
    """A 1x1 conv's weight as a matrix (out, in)."""
    return conv.weight[:, :, 0, 0]


def _bn(bn: nn.BatchNorm2d, z: torch.Tensor) -> torch.Tensor:
    """BatchNorm by hand on (B, C, L): batch statistics over B and L in train mode."""
    if bn.training:
        mean, var = z.mean(dim=(0, 2)), z.var(dim=(0, 2), unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    return (z - mean[:, None]) / torch.sqrt(var[:, None] + bn.eps) * bn.weight[:, None] + bn.bias[:, None]


def _hswish(v: torch.Tensor) -> torch.Tensor:
    return v * torch.clamp(v + 3, 0, 6) / 6


def _channel_weights(gate, f: torch.Tensor) -> torch.Tensor:
    """CBAM's channel weights of one map f (C, H, W) by hand: (C,)."""
    def mlp(v):
        return _w(gate.mlp[2]) @ torch.relu(_w(gate.mlp[0]) @ v)

    return torch.sigmoid(mlp(f.mean(dim=(1, 2))) + mlp(f.amax(dim=(1, 2))))


def _reference(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module's equations written out per image with explicit loops and einsum."""
    b_, c_, h_, w_ = x.shape
    name, form = type(m).__name__, m.form
    # strips per image: rows[b, c, i] = mean_j x[b, c, i, j]; cols[b, c, j] = mean_i x[b, c, i, j]
    rows = torch.stack([torch.stack([x[b, :, i, :].mean(dim=1) for i in range(h_)], 1) for b in range(b_)])
    cols = torch.stack([torch.stack([x[b, :, :, j].mean(dim=1) for j in range(w_)], 1) for b in range(b_)])
    if form == "hou":
        s = torch.stack([_channel_weights(m.gate, x[b]) for b in range(b_)]) if m.gate is not None else None
        if name == "CCAPM" and s is not None:
            cols = cols * s[:, :, None]  # channel weights on the W strip
            if m.chan_embed == "xy":
                rows = rows * s[:, :, None]
        z = torch.einsum("mc,bcl->bml", _w(m.core.embed[0]), torch.cat([rows, cols], dim=2))
        z = _hswish(_bn(m.core.embed[1], z))
        ax = torch.sigmoid(torch.einsum("cm,bmi->bci", _w(m.core.conv_x), z[:, :, :h_]))
        ay = torch.sigmoid(torch.einsum("cm,bmj->bcj", _w(m.core.conv_y), z[:, :, h_:]))
        out = torch.empty_like(x)
        for b in range(b_):
            for i in range(h_):
                for j in range(w_):
                    gain = ax[b, :, i] + ay[b, :, j] if m.combine == "add" else ax[b, :, i] * ay[b, :, j]
                    out[b, :, i, j] = x[b, :, i, j] * gain
        if name == "CCASM":
            out = torch.stack([out[b] * _channel_weights(m.gate, out[b])[:, None, None] for b in range(b_)])
        return out
    e_h = torch.sigmoid(torch.einsum("oc,bci->boi", _w(m.conv_h), rows))  # E_y of the paper, (B, C, H)
    e_w = torch.sigmoid(torch.einsum("oc,bcj->boj", _w(m.conv_w), cols))  # E_x of the paper, (B, C, W)
    if name == "CCAPM":
        s = torch.stack([_channel_weights(m.gate, x[b]) for b in range(b_)])  # (B, C)
        fc = x * s[:, :, None, None]  # F_c = F . sigma(MLP(avg) + MLP(max))
        # eq 11-12: F_x = Pool_avg(E_x * F_c) over H, F_y = Pool_avg(E_y * F_c) over W
        f_w = torch.stack([(e_w[:, :, None, j] * fc[:, :, :, j]).mean(dim=2) for j in range(w_)], 2)
        f_h = torch.stack([(e_h[:, :, i, None] * fc[:, :, i, :]).mean(dim=2) for i in range(h_)], 2)
        z = _bn(m.bn, torch.einsum("oc,bcl->bol", _w(m.fuse), torch.cat([f_h, f_w], dim=2)))  # eq 13
        out = torch.empty_like(x)
        for i in range(h_):
            for j in range(w_):
                out[:, :, i, j] = x[:, :, i, j] * (torch.sigmoid(z[:, :, i]) + torch.sigmoid(z[:, :, h_ + j]))
        return out
    a = torch.einsum("bci,bcj->bcij", e_h, e_w)  # eq 15: the outer product per channel
    g = torch.einsum("oc,bcij->boij", _w(m.fuse), a).reshape(b_, c_, h_ * w_)
    g = _hswish(_bn(m.bn, g)).reshape(b_, c_, h_, w_)  # eq 16
    return torch.stack([x[b] * torch.sigmoid(g[b] * _channel_weights(m.gate, g[b])[:, None, None])
                        for b in range(b_)])  # eq 17


def _randomise_norms(m: nn.Module) -> None:
    """Non-trivial BatchNorm affine parameters and running statistics."""
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            with torch.no_grad():
                mod.weight.uniform_(0.5, 1.5), mod.bias.uniform_(-0.5, 0.5)
                mod.running_mean.uniform_(-0.2, 0.2), mod.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name,form", FORM_CASES)
def test_form_matches_hand_written_reference(name, form, train):
    m = build_attention(name, 16, form=form)
    _randomise_norms(m)
    m.train(train)
    x = torch.randn(2, 16, 4, 6)  # non-square: a swapped axis cannot pass
    with torch.no_grad():
        torch.testing.assert_close(m(x), _reference(m, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [{"combine": "mul"}, {"chan_embed": "xy"}, {"chan_embed": "", "combine": "mul"}])
def test_hou_ccapm_options_match_the_reference(options):
    m = CCAPM(16, **options).eval()
    _randomise_norms(m)
    x = torch.randn(1, 16, 5, 3)
    with torch.no_grad():
        torch.testing.assert_close(m(x), _reference(m, x), rtol=1e-5, atol=1e-5)


def test_paper_ccapm_gain_is_an_add_of_two_sigmoids():
    """ADD of two gates in (0, 1): the output over the input lies in (0, 2), never 0 or 2."""
    m = CCAPM(16, form="paper").eval()
    x = torch.rand(1, 16, 5, 5) + 0.5  # positive, so the ratio is the gain
    gain = m(x) / x
    assert 0 < gain.min() and gain.max() < 2 and gain.max() > 1  # an ADD, not a product


def test_default_form_keeps_old_state_dicts():
    """Checkpoints from before ``form`` existed load: the default is "hou" with the same keys."""
    assert CCAPM(16).form == CCASM(16).form == "hou"
    core = ["core.embed.0.weight", "core.embed.1.weight", "core.embed.1.bias", "core.embed.1.running_mean",
            "core.embed.1.running_var", "core.embed.1.num_batches_tracked", "core.conv_x.weight", "core.conv_y.weight"]
    gate = ["gate.mlp.0.weight", "gate.mlp.2.weight"]
    assert list(CCAPM(16).state_dict()) == gate + core
    assert list(CCASM(16).state_dict()) == core + gate


def test_paper_form_refuses_hou_options():
    with pytest.raises(ValueError, match=r"form='paper' fixes \['chan_embed', 'combine'\]"):
        build_attention("ccapm", 16, form="paper", combine="mul", chan_embed="y")
    with pytest.raises(ValueError, match=r"form='paper' fixes \['combine'\]"):
        build_attention("ccasm", 16, form="paper", combine="add")
    with pytest.raises(ValueError, match="form='literal'; choose from \\['hou', 'paper'\\]"):
        build_attention("ccasm", 16, form="literal")


@pytest.mark.parametrize("name,form", FORM_CASES)
def test_every_form_parameter_gets_a_gradient_at_batch_one(name, form):
    m = build_attention(name, 16, form=form).train()
    m(torch.randn(1, 16, 3, 5)).square().sum().backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}/{form}.{pname} got no gradient"
    for mod in m.modules():
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            assert mod.bias is None


def test_describe_attention_names_the_form():
    from noduledet.models.attention import describe_attention

    assert describe_attention("ccapm") == "ccapm (form 'hou', combine 'add', chan_embed 'y')"
    assert describe_attention("ccasm", form="paper") == "ccasm (form 'paper', combine 'outer')"
    assert describe_attention("se") == "se" and describe_attention(None) == "none"


def test_describe_attention_of_a_built_module():
    from noduledet.models.attention import describe_attention

    assert describe_attention(CCASM(32, form="paper")) == "ccasm (form 'paper', combine 'outer')"
    assert describe_attention(SpatialChannel(16)) == "SpatialChannel" and describe_attention(nn.Identity()) == "none"
