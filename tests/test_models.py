"""Models by name: published parameter counts, output shapes, channels_last, names and errors."""

import pytest
import torch
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck

from fastsd.models import DenseNetBC, create_model, get_model_info, list_models, model_input_size


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# Published counts: He et al. 2016 Table 6 (ResNets, CIFAR-10), Huang et al. 2017 Table 2
# (DenseNet-BC), torchvision / He et al. (ResNet-152, 1000 classes). The papers round to 2-3
# digits (DenseNet-BC-100 is 0.769 M, quoted as 0.8 M), hence 5 %.
PUBLISHED = [
    ("resnet20", 10, 0.27e6),
    ("resnet32", 10, 0.46e6),
    ("resnet44", 10, 0.66e6),
    ("resnet56", 10, 0.85e6),
    ("resnet110", 10, 1.7e6),
    ("densenet_bc_100", 10, 0.8e6),
    ("densenet_bc_190", 10, 25.6e6),
    ("resnet152", 1000, 60.2e6),
]


@pytest.mark.parametrize("name,classes,published", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_parameter_count_matches_paper(name, classes, published):
    assert n_params(create_model(name, classes)) == pytest.approx(published, rel=0.05)


def test_exact_counts_of_the_cifar_designs():
    # Option-A shortcuts are parameter-free: 269,722 is the count of the paper's ResNet-20;
    # option B adds the two 1x1 projections (+BN). DenseNet-BC-100 (k=12): 769,162.
    assert n_params(create_model("resnet20", 10)) == 269_722
    assert n_params(create_model("resnet20", 10, shortcut="B")) == 272_474
    assert n_params(create_model("densenet_bc_100", 10)) == 769_162
    # The classifier is the only part that depends on the class count.
    assert (n_params(create_model("resnet20", 100)) - n_params(create_model("resnet20", 10))
            == 90 * 65)


CIFAR_FORWARD = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "densenet_bc_100"]


@pytest.mark.parametrize("name", CIFAR_FORWARD)
def test_cifar_forward_shape(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)                      # train mode
    assert out.shape == (2, 7) and out.dtype == torch.float32
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 7)


@pytest.mark.parametrize("name,size", [("resnet18", 64), ("mobilenet_v3_small", 64),
                                       ("googlenet", 64), ("inception_v3", 75)])
def test_torchvision_forward_is_one_tensor_in_train_mode(name, size):
    # inception_v3 and googlenet return namedtuples with aux heads by default in torchvision.
    model = create_model(name, num_classes=5)
    out = model(torch.randn(2, 3, size, size))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5)


def test_torchvision_state_dict_matches_torchvision_model():
    ours = create_model("resnet18", 10)
    theirs = torchvision.models.resnet18(weights=None, num_classes=10)
    theirs.load_state_dict(ours.state_dict())  # strict: same keys and shapes


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_torchvision_resnets_start_with_identity_residual_blocks(name):
    """Each block's last BatchNorm scale starts at zero, so a block starts as the identity and the
    whole net as stem -> pool -> fc; zero_init_residual=False gives torchvision's init back."""
    model = create_model(name, 10).eval()
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert blocks
    for block in blocks:
        last = block.bn3 if isinstance(block, Bottleneck) else block.bn2
        assert torch.count_nonzero(last.weight) == 0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        stream = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            for block in layer:  # identity, or the downsampling shortcut
                stream = torch.relu(block.downsample(stream) if block.downsample is not None
                                    else stream)
        expected = model.fc(torch.flatten(model.avgpool(stream), 1))
        torch.testing.assert_close(model(x), expected)
    default = create_model(name, 10, zero_init_residual=False)
    assert all(torch.all(b.bn2.weight == 1) for b in default.modules() if isinstance(b, BasicBlock))
    assert all(torch.all(b.bn3.weight == 1) for b in default.modules() if isinstance(b, Bottleneck))


def _small_densenet(**kw):
    # Depth 40 instead of 100: the same layer types, a fraction of the CPU time.
    return DenseNetBC(depth=40, growth_rate=12, num_classes=10, **kw)


@pytest.mark.parametrize("name,batch,size", [("resnet20", 2, 32), ("densenet_bc", 2, 32),
                                             ("resnet18", 4, 64)])
def test_channels_last_gives_the_same_output_and_gradients(name, batch, size):
    # In float64: the layouts sum in different orders, and in float32 that can flip the sign of a
    # pre-ReLU value within 1e-7 of zero (seen with resnet20 under OMP_NUM_THREADS=1), which
    # changes a gradient by a large step no tolerance can tell from a real difference.
    torch.manual_seed(0)
    model = _small_densenet() if name == "densenet_bc" else create_model(name, num_classes=10)
    model = model.double()
    x = torch.randn(batch, 3, size, size, dtype=torch.float64)
    upstream = torch.randn(batch, 10, dtype=torch.float64)
    ref = model(x)
    (ref * upstream).sum().backward()
    ref_grad = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model = model.to(memory_format=torch.channels_last)
    out = model(x.contiguous(memory_format=torch.channels_last))
    (out * upstream).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    for p, g in zip(model.parameters(), ref_grad):
        # Summation order differs between the layouts: compare against the gradient's scale.
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-10 * (1 + g.abs().max().item()))


def test_option_a_shortcut_keeps_channels_last():
    model = create_model("resnet20", 10).to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 32, 32).contiguous(memory_format=torch.channels_last)
    y = model.layer2[0].shortcut(x)
    assert y.shape == (2, 32, 16, 16)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2]) and not y[:, 16:].any()


def test_densenet_memory_efficient_gives_the_same_gradients_and_statistics():
    """Only the memory differs: the backward pass's recomputation does not update the BatchNorm
    running statistics a second time (num_batches_tracked went up by 2 a step)."""
    torch.manual_seed(0)
    a = _small_densenet()
    b = _small_densenet(memory_efficient=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, sa), sb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(sa, sb), name


def test_cifar_resnet_forward_is_he_et_als_network():
    """The forward of a CIFAR ResNet-20, written out from its layers in plain torch functional
    calls (He et al. 2016, section 4.2): 3x3 conv stem, three stages of basic blocks whose
    residual sum is followed by a ReLU, option-A shortcuts (stride-2 subsampling, zero channels),
    global average pooling, a linear classifier. A dropped ReLU or shortcut, or blocks in the
    wrong order, would not match."""
    torch.manual_seed(0)
    model = create_model("resnet20", 10).eval()
    for m in model.modules():  # non-trivial statistics and affine parameters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    x = torch.randn(2, 3, 32, 32)
    F = torch.nn.functional

    def bn(m, h):
        return F.batch_norm(h, m.running_mean, m.running_var, m.weight, m.bias, eps=m.eps)

    def conv(m, h):
        return F.conv2d(h, m.weight, stride=m.stride, padding=1)

    h = F.relu(bn(model.bn1, conv(model.conv1, x)))
    blocks = [b for stage in (model.layer1, model.layer2, model.layer3) for b in stage]
    widths = [b.conv1.out_channels for b in blocks]
    assert widths == [16] * 3 + [32] * 3 + [64] * 3
    for b in blocks:
        out = bn(b.bn2, conv(b.conv2, F.relu(bn(b.bn1, conv(b.conv1, h)))))
        short = h
        if out.shape != h.shape:  # option A: subsample, then zero channels
            short = h[:, :, ::2, ::2]
            short = torch.cat([short, torch.zeros_like(short)], dim=1)
        h = F.relu(out + short)
    expected = F.linear(h.mean((2, 3)), model.fc.weight, model.fc.bias)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_list_models_and_input_sizes():
    names = list_models()
    for name in ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "densenet_bc_100",
                 "densenet_bc_190"]:
        assert name in list_models("cifar")
        assert get_model_info(name).family == "cifar" and model_input_size(name) == 32
    tv = torchvision.models.list_models(module=torchvision.models)
    assert set(tv) <= set(names) and set(tv) == set(list_models("imagenet"))
    assert (model_input_size("resnet50") == 224
            and get_model_info("resnet50").eval_resize_size == 256)
    # the shorter side of the recipe's evaluation resize: not always crop / 0.875
    assert [get_model_info(n).eval_resize_size for n in ("inception_v3", "efficientnet_b7",
                                                         "swin_v2_t", "vit_h_14")] == [
        342, 600, 260, 256]
    # what the data layer is given: the crop's part of that side; none for the CIFAR designs
    assert [get_model_info(n).eval_crop_fraction for n in ("resnet50", "efficientnet_b7",
                                                           "resnet20")] == [0.875, 1.0, None]
    # the crop of each architecture's own ImageNet recipe (torchvision's IMAGENET1K_V1 metadata)
    assert [model_input_size(n) for n in ("inception_v3", "efficientnet_b1", "efficientnet_b7",
                                          "efficientnet_v2_s", "swin_v2_t", "vit_h_14")] == [
        299, 240, 600, 384, 256, 224]
    for spelling, name in (("ResNet-20", "resnet20"), ("resnet_20", "resnet20"),
                           ("DenseNet-BC-100", "densenet_bc_100"),
                           ("densenet_bc100", "densenet_bc_100"), ("Wide-ResNet50-2",
                                                                   "wide_resnet50_2")):
        assert get_model_info(spelling).name == name, spelling


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match=r"unknown model 'resnet21'.*resnet20.*list_models"):
        create_model("resnet21", 10)
    with pytest.raises(ValueError, match="densenet_bc_100"):
        get_model_info("densenet_bc101")
    # Without its separators this name fits two models (regnet_x_1_6gf, regnet_x_16gf): refused.
    with pytest.raises(ValueError, match="unknown model 'regnetx16gf'"):
        get_model_info("regnetx16gf")


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet20", 0)
    with pytest.raises(ValueError, match="never downloads"):
        create_model("resnet18", 1000, weights="DEFAULT")
    with pytest.raises(ValueError, match="shortcut"):
        create_model("resnet20", 10, shortcut="C")
    with pytest.raises(TypeError, match="resnet20"):
        create_model("resnet20", 10, no_such_option=1)
    with pytest.raises(TypeError, match="model 'densenet_bc_100' does not accept.*depth"):
        create_model("densenet_bc_100", 10, depth=40)  # the name fixes the depth


# Every model but the RegNets, which torchvision cannot build on the meta device (the
# constructor reads values; on the CPU the largest takes 23 s): they run on any side.
_SIZE_CHECKED = [n for n in list_models() if not n.startswith("regnet")]


@pytest.mark.parametrize("name", _SIZE_CHECKED)
def test_input_size_limits_are_those_the_networks_have(name):
    """The table behind check_input_size against a forward on the meta device (no memory): the
    smallest side runs and one pixel less does not; a fixed size runs and its neighbours not.
    The trainer's automatic size for synthetic data passes the check."""
    from fastsd.models import check_input_size, get_model_info
    from fastsd.train.config import auto_image_size

    with torch.device("meta"):
        model = create_model(name, 10).eval()

    def runs(side):
        try:
            model(torch.empty(1, 3, side, side, device="meta"))
            return True
        except (RuntimeError, AssertionError, ValueError):
            return False

    info = get_model_info(name)
    if info.fixed_input_size:
        assert runs(info.input_size) and not runs(info.input_size + 1) and not runs(64)
        with pytest.raises(ValueError, match=f"{info.input_size}x{info.input_size} images only"):
            check_input_size(name, 64)
    else:
        assert runs(info.min_input_size) and runs(info.input_size)
        if info.min_input_size > 1:
            assert not runs(info.min_input_size - 1)
            with pytest.raises(ValueError, match=f"at least {info.min_input_size}x"):
                check_input_size(name, info.min_input_size - 1)
    check_input_size(name, auto_image_size("synthetic", name))
