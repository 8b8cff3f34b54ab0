import pytest
import torch
from torch.func import functional_call

from dfml_bench.errors import DfmlError
from dfml_bench.models import architecture_names, build_model


@pytest.mark.parametrize("architecture", architecture_names())
@pytest.mark.parametrize("image_size", [32, 84])
def test_forward_shapes(architecture: str, image_size: int) -> None:
    model = build_model(architecture, num_classes=5, image_size=image_size).eval()
    logits = model(torch.randn(2, 3, image_size, image_size))
    assert logits.shape == (2, 5)
    assert model.embed(torch.randn(2, 3, image_size, image_size)).shape == (2, model.feature_dim)


def test_conv4_has_32_filters_and_flatten_head() -> None:
    model = build_model("conv4", 5, 84)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 32, 32]
    assert model.head.in_features == 32 * 5 * 5


def test_functional_call_matches_module() -> None:
    model = build_model("resnet10", 5, 32).eval()
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    images = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(
        functional_call(model, {**params, **buffers}, (images,)), model(images)
    )


def test_unknown_architecture_is_a_clear_error() -> None:
    with pytest.raises(DfmlError, match="unknown architecture 'vgg'"):
        build_model("vgg", 5, 32)
    assert {"conv4", "resnet10", "resnet18"} <= set(architecture_names())


def test_global_pools_take_the_mean_or_the_max_of_the_last_map() -> None:
    """conv4-gap averages the last feature map, conv4-gmp (FREE's MH meta-model, their
    AdaptiveMaxPool2d) takes its maximum; both give one head for any input size."""
    torch.manual_seed(0)
    mean_pool, max_pool = build_model("conv4-gap", 5, 84), build_model("conv4-gmp", 5, 84)
    max_pool.load_state_dict(mean_pool.state_dict())
    images = torch.randn(2, 3, 84, 84)
    maps = mean_pool.eval().features(images)
    torch.testing.assert_close(mean_pool.embed(images), maps.mean(dim=(2, 3)))
    torch.testing.assert_close(max_pool.eval().embed(images), maps.amax(dim=(2, 3)))
    assert max_pool(torch.randn(2, 3, 32, 32)).shape == (2, 5)
