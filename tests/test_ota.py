"""OTA: neuron alignment by optimal transport undoes permutations that plain averaging cannot."""

import torch

from dfml_bench.methods.ota import activation_costs, align_to, conv_layers, transport_matrix
from dfml_bench.models import build_model
from dfml_bench.zoo.fusion import average_state_dicts


def _trained_looking_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("conv4", 5, 32)
    with torch.no_grad():  # non-trivial BN parameters and buffers, so they must move too
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _permuted_copy(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The same function with every block's channels randomly permuted."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    previous = None
    for block in conv_layers(state):
        channels = state[f"{block}.0.weight"].shape[0]
        order = torch.randperm(channels, generator=generator)
        if previous is not None:
            state[f"{block}.0.weight"] = state[f"{block}.0.weight"][:, previous]
        for name in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
            state[f"{block}.{name}"] = state[f"{block}.{name}"][order]
        previous = order
    head = state["head.weight"].view(5, 32, -1)[:, previous]
    state["head.weight"] = head.reshape(5, -1)
    return state


def _outputs(state: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    model = build_model("conv4", 5, 32)
    model.load_state_dict(state)
    with torch.no_grad():
        return model.eval()(images)


def test_fusing_a_model_with_its_permuted_copy_gives_back_the_model() -> None:
    model = _trained_looking_model(0)
    permuted = _permuted_copy(model, 1)
    images = torch.randn(8, 3, 32, 32)
    expected = _outputs(model.state_dict(), images)
    torch.testing.assert_close(_outputs(permuted, images), expected, rtol=1e-4, atol=1e-4)

    reference = model.state_dict()
    fused = average_state_dicts([reference, align_to(permuted, reference)])
    torch.testing.assert_close(_outputs(fused, images), expected, rtol=1e-4, atol=1e-4)
    plain = average_state_dicts([reference, permuted])
    assert not torch.allclose(_outputs(plain, images), expected, rtol=1e-2, atol=1e-2)


def test_activation_cost_also_recovers_the_permutation() -> None:
    model = _trained_looking_model(0)
    permuted_state = _permuted_copy(model, 2)
    permuted = build_model("conv4", 5, 32)
    permuted.load_state_dict(permuted_state)
    costs = activation_costs(permuted, model, 32, torch.Generator().manual_seed(0))
    aligned = align_to(permuted_state, model.state_dict(), costs)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(aligned[name], value, rtol=1e-5, atol=1e-5, msg=name)


def test_identity_plans_make_ota_plain_averaging() -> None:
    a, b = _trained_looking_model(0).state_dict(), _trained_looking_model(3).state_dict()
    identities = [torch.eye(32) * 0 + (1 - torch.eye(32)) for _ in conv_layers(a)]  # cost 0 on diag
    aligned = align_to(b, a, identities)
    for name, value in b.items():
        torch.testing.assert_close(aligned[name], value, msg=name)


def test_transport_matrix_of_a_permutation_cost_is_that_permutation() -> None:
    order = torch.tensor([2, 0, 1])
    cost = torch.ones(3, 3)
    cost[torch.arange(3), order] = 0
    plan = transport_matrix(cost)
    assert torch.equal(plan, torch.eye(3)[order])
