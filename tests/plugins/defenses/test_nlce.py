"""NLCE (non-local context encoder): blocks, insertion into smp models, the fine-tune."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError

from medaudit.core.models import PixelSpaceModel
from medaudit.plugins.models.demo import _unet_2d_params
from medaudit.plugins.defenses._nlce import (
    NLCE,
    ChannelAttention,
    ContextEncoding,
    NLCEEncoder,
    NLCEParams,
    NonLocalBlock,
    apply_nlce,
    dataset_loss,
    fine_tune,
    insert_nlce,
    nlce_modules,
    nlce_parameter_count,
)
from medaudit.plugins.models.smp import SmpParams, build_smp

@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tests are small, and two threads on a busy two-core
    machine spend most of their time waiting for each other."""
    torch.set_num_threads(1)


SHAPES = [(1, (5, 7)), (3, (9, 4)), (32, (7, 7)), (48, (1, 3)), (192, (4, 4))]


def demo_unet() -> torch.nn.Module:
    """The demo U-Net's architecture (tu-test_resnet encoder), randomly initialised."""
    torch.manual_seed(0)
    return build_smp(_unet_2d_params(None))


@pytest.mark.parametrize("channels,spatial", SHAPES)
def test_blocks_keep_shapes_forward_and_backward(channels, spatial):
    torch.manual_seed(0)
    x = torch.randn(2, channels, *spatial, requires_grad=True)
    nl = NonLocalBlock(channels, zero_init=False)
    enc = ContextEncoding(channels, codewords=8)
    att = ChannelAttention(enc.dim, channels)
    assert nl(x).shape == x.shape
    context = enc(x)
    assert context.shape == (2, min(channels, 512))
    assert enc.encode(x).shape == (2, 8, enc.dim)
    gamma = att(context)
    assert gamma.shape == (2, channels) and bool(((gamma > 0) & (gamma < 1)).all())
    for attention in ("scaled_residual", "residual", "multiply"):
        block = NLCE(channels, codewords=8, attention=attention, zero_init=False)
        y = block(x)
        assert y.shape == x.shape
        (grad,) = torch.autograd.grad(y.square().sum(), x)
        assert grad.shape == x.shape and bool(grad.isfinite().all())


def test_nlce_on_volumes_and_with_subsampled_keys():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3, 5, 7, requires_grad=True)
    y = NLCE(6, codewords=4, zero_init=False)(x)
    assert y.shape == x.shape
    nl = NonLocalBlock(6, subsample=2, zero_init=False)
    assert nl(x).shape == x.shape
    x2 = torch.randn(1, 16, 9, 11)
    assert NLCE(16, subsample=3, zero_init=False)(x2).shape == x2.shape


def test_non_local_block_matches_its_formula():
    torch.manual_seed(0)
    block = NonLocalBlock(6, zero_init=False).eval()
    torch.nn.init.uniform_(block.norm.running_mean, -0.2, 0.2)
    x = torch.randn(2, 6, 3, 4)
    flat = x.flatten(2)

    def proj(conv):  # 1x1 projection as a matrix product
        return torch.einsum("oc,bcn->bon", conv.weight[..., 0], flat) + conv.bias[:, None]

    theta, phi, g = proj(block.theta), proj(block.phi), proj(block.g)
    a = torch.softmax(torch.einsum("bci,bcj->bij", theta, phi), dim=-1)
    y = torch.einsum("bij,bcj->bci", a, g)
    z = torch.einsum("oc,bcn->bon", block.out.weight[..., 0], y)
    bn = block.norm
    z = (z - bn.running_mean[:, None]) / torch.sqrt(bn.running_var[:, None] + bn.eps) * bn.weight[:, None] + bn.bias[:, None]
    torch.testing.assert_close(block(x), x + z.view_as(x), rtol=1e-4, atol=1e-5)


def test_context_encoding_matches_encnet_formulas():
    torch.manual_seed(0)
    enc = ContextEncoding(5, codewords=3).eval()
    x = torch.randn(2, 5, 4, 3)
    feats, a = enc.assign(x)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 12))
    assert bool((enc.smoothing > 0).all())
    # explicit residuals r_ik = x_i - d_k, e_ik = softmax_k(-s_k |r_ik|^2), e_k = sum_i e_ik r_ik
    r = feats[:, :, None, :] - enc.codewords[None, None]  # B x N x K x D
    weights = torch.softmax(-enc.smoothing * r.square().sum(-1), dim=-1)
    torch.testing.assert_close(a, weights, rtol=1e-4, atol=1e-6)
    e = (weights[..., None] * r).sum(1)
    torch.testing.assert_close(enc.encode(x), e, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(enc(x), torch.relu(enc.norm(e)).sum(1), rtol=1e-4, atol=1e-5)
    # wide maps are first projected to encoding_channels
    assert ContextEncoding(600, codewords=4).dim == 512


@pytest.mark.parametrize("channels,spatial", SHAPES)
def test_nlce_is_the_identity_at_init(channels, spatial):
    torch.manual_seed(0)
    x = torch.randn(3, channels, *spatial)
    block = NLCE(channels)
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)
    torch.testing.assert_close(block.eval()(x), x, rtol=0, atol=0)


def test_gradients_reach_codebook_smoothing_and_attention():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 6, 5)
    block = NLCE(16, codewords=8, zero_init=False)
    block(x).square().mean().backward()
    for name in ("encoding.codewords", "encoding.raw_smoothing", "attention.fc.weight", "attention_scale",
                 "non_local.theta.weight", "non_local.phi.weight", "non_local.g.weight", "non_local.out.weight"):
        grad = block.get_parameter(name).grad
        assert grad is not None and float(grad.abs().sum()) > 0, name

    # from the identity init, one step opens the zero-initialised scales; then every weight learns
    block = NLCE(16, codewords=8)
    optimiser = torch.optim.SGD(block.parameters(), lr=0.1)
    target = torch.randn_like(x)
    for _ in range(2):
        optimiser.zero_grad()
        (block(x) - target).square().mean().backward()
        optimiser.step()
    for name, p in block.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_insert_nlce_keeps_output_and_shape_of_a_demo_unet():
    net = demo_unet().eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        before = net(x)
    assert list(net.encoder.out_channels) == [1, 32, 32, 48, 192]
    out = insert_nlce(net)
    assert out is net and isinstance(net.encoder, NLCEEncoder)
    assert net.encoder.levels == [2, 3, 4]
    assert [m.channels for m in nlce_modules(net)] == [32, 48, 192]
    assert list(net.encoder.out_channels) == [1, 32, 32, 48, 192]  # forwarded to the wrapped encoder
    with torch.no_grad():
        after = net(x)
    assert after.shape == (2, 5, 64, 64)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    keys = net.state_dict().keys()
    assert any(k.startswith("encoder.encoder.") for k in keys) and any(k.startswith("encoder.nlce.4.") for k in keys)
    with pytest.raises(ValueError, match="already has NLCE"):
        insert_nlce(net)


def test_insert_nlce_levels_seed_freezing_and_wrappers():
    net = demo_unet()
    model = PixelSpaceModel(net, [0.5], [0.25], 1)
    insert_nlce(model, levels=[-1, 1], freeze_base=True, seed=3)
    assert net.encoder.levels == [1, 4]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".nlce." in n for n in trainable)
    assert nlce_parameter_count(model) == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    # the seed fixes the new weights and leaves the global random state alone
    state = torch.random.get_rng_state()
    other = insert_nlce(demo_unet(), levels=[-1, 1], seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.testing.assert_close(other.encoder.nlce["4"].encoding.codewords, net.encoder.nlce["4"].encoding.codewords)
    for bad in ([0], [5], [-5]):
        with pytest.raises(ValueError, match="level"):
            insert_nlce(demo_unet(), levels=bad)
    with pytest.raises(ValueError, match="segmentation-models-pytorch"):
        insert_nlce(torch.nn.Conv2d(1, 1, 1))


@pytest.mark.parametrize("arch", ["Linknet", "DeepLabV3Plus"])
def test_insert_nlce_into_other_architectures(arch):
    torch.manual_seed(0)
    net = build_smp(SmpParams(arch=arch, encoder="tu-test_resnet", encoder_depth=4, in_channels=1, classes=3)).eval()
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        before = net(x)
        after = insert_nlce(net, levels=[3, 4])(x)
    assert after.shape == (1, 3, 32, 32)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def _base_state(model):
    """The base network's state (its keys as before insertion), NLCE weights left out."""
    return {k.replace("encoder.encoder.", "encoder."): v.clone() for k, v in model.state_dict().items() if ".nlce." not in k}


def test_fine_tune_lowers_the_loss_is_deterministic_and_ends_frozen(seg_model, seg_data):
    images, masks = seg_data.images[:8], seg_data.masks[:8]
    base_loss = dataset_loss(seg_model.module, images, masks)
    runs = []
    for _ in range(2):
        model = insert_nlce(copy.deepcopy(seg_model.module), seed=0)
        before = _base_state(model)
        facts = fine_tune(model, images, masks, steps=12, lr=1e-2, batch_size=4, generator=torch.Generator().manual_seed(0))
        runs.append((model, facts))
        assert facts["steps"] == 12 and facts["seconds"] > 0
        assert facts["trainable_parameters"] == nlce_parameter_count(model)
        assert facts["initial_loss"] == pytest.approx(base_loss, rel=1e-5)  # the identity init
        assert facts["final_loss"] < facts["initial_loss"]
        assert not model.training and not any(m.training for m in model.modules())
        assert not any(p.requires_grad for p in model.parameters())
        after = _base_state(model)
        assert all(torch.equal(before[k], after[k]) for k in before), "the frozen base network changed"
    (a, facts_a), (b, facts_b) = runs
    assert facts_a["final_loss"] == facts_b["final_loss"]
    for (name, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), name
    other = insert_nlce(copy.deepcopy(seg_model.module), seed=0)
    facts_c = fine_tune(other, images, masks, steps=12, lr=1e-2, batch_size=4, generator=torch.Generator().manual_seed(1))
    assert facts_c["final_loss"] != facts_a["final_loss"]


def test_fine_tune_of_the_whole_network(seg_model, seg_data):
    images, masks = seg_data.images[:4], seg_data.masks[:4]
    model = copy.deepcopy(seg_model.module)
    before = _base_state(model)
    params = NLCEParams(levels=[-1], steps=2, lr=1e-3, batch_size=2, train_base=True, flip=False)
    facts = apply_nlce(model, images, masks, params)
    assert facts["levels"] == [4] and facts["parameters_added"] == nlce_parameter_count(model) > 0
    assert facts["trainable_parameters"] == sum(p.numel() for p in model.parameters())
    after = _base_state(model)
    assert after.keys() == before.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="no NLCE modules"):
        fine_tune(copy.deepcopy(seg_model.module), images, masks, steps=1, lr=1e-3, batch_size=2,
                  generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="do not match"):
        fine_tune(model, images, masks[:, :8], steps=1, lr=1e-3, batch_size=2, generator=torch.Generator())


def test_params_defaults_and_validation():
    p = NLCEParams()
    assert (p.codewords, p.reduction, p.attention, p.levels, p.train_base) == (32, 2, "scaled_residual", None, False)
    for name, field in NLCEParams.model_fields.items():
        assert field.description, name
    assert NLCEParams(levels=[-1, 3]).levels == [-1, 3]
    for bad in ({"levels": []}, {"levels": [0]}, {"levels": [2, 2]}, {"codewords": 0}, {"attention": "add"}, {"extra": 1}):
        with pytest.raises(ValidationError):
            NLCEParams(**bad)
