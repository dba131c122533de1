"""The network on tiny tensors: DynamicUnet on a ResNet-18, its output range, one training step."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from depthpipe.config import parse_params
from depthpipe.encoders import build_resnet
from depthpipe.model import DepthModule, DepthNet, ModelSpec, build_unet
from tests.helpers import committed_params

SPEC = ModelSpec(arch="resnet18", height=32, width=48, min_depth=0.6, max_depth=350.0)
LOG_RANGE = (math.log(SPEC.min_depth), math.log(SPEC.max_depth))
BATCH = 2
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def built_net() -> DepthNet:
    torch.manual_seed(0)
    return DepthNet(build_unet(build_resnet(SPEC.arch), SPEC))


@pytest.fixture
def net(built_net: DepthNet) -> DepthNet:
    """A fresh copy per test (a forward in training mode updates BatchNorm statistics)."""
    return copy.deepcopy(built_net)


def _last_conv(net: nn.Module) -> nn.Conv2d:
    return [m for m in net.modules() if isinstance(m, nn.Conv2d)][-1]


def _module(seed: int = 0) -> DepthModule:
    """A DepthModule with the committed fine-tuning settings, constant learning rate (the
    one-cycle schedule needs a Trainer to count steps)."""
    cfg = parse_params(committed_params()).finetune
    torch.manual_seed(seed)
    return DepthModule(
        build_unet(build_resnet(SPEC.arch), SPEC),
        loss=cfg.loss,
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        schedule="constant",
        weight_decay=cfg.weight_decay,
        min_depth=SPEC.min_depth,
        max_depth=SPEC.max_depth,
    )


def _batch(height: int = SPEC.height, width: int = SPEC.width) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    depth = 1.0 + 99.0 * torch.rand(BATCH, 1, height, width, generator=generator)
    mask = torch.rand(BATCH, 1, height, width, generator=generator) > 0.2  # some invalid pixels
    image = torch.rand(BATCH, 3, height, width, generator=generator)
    return {"image": image, "depth": depth, "mask": mask}


def test_build_unet__returns_training_mode_network() -> None:
    # DynamicUnet's sizing forward leaves eval mode on; build_unet must switch back.
    unet = build_unet(build_resnet(SPEC.arch), SPEC)
    assert unet.training and all(m.training for m in unet.modules())


@pytest.mark.parametrize(
    ("height", "width"),
    [(SPEC.height, SPEC.width), (64, 96), (40, 56), (33, 47)],
    ids=["img_size", "double", "other_multiple_of_8", "odd"],
)
def test_depth_net__output_is_log_depth_in_range_at_input_size(
    net: DepthNet, height: int, width: int
) -> None:
    image = torch.rand(BATCH, 3, height, width, generator=torch.Generator().manual_seed(2))
    for mode in (net.train, net.eval):
        mode()
        with torch.no_grad():
            log_depth = net(image)
        assert log_depth.shape == (BATCH, 1, height, width)
        assert torch.isfinite(log_depth).all()
        assert LOG_RANGE[0] <= log_depth.min() and log_depth.max() <= LOG_RANGE[1]
        # exp of the output is a depth in metres inside the valid range
        depth = log_depth.exp()
        assert SPEC.min_depth * 0.999 <= depth.min() and depth.max() <= SPEC.max_depth * 1.001


@pytest.mark.parametrize(("bias", "bound"), [(1e4, LOG_RANGE[1]), (-1e4, LOG_RANGE[0])])
def test_depth_net__saturated_output_stops_at_y_range(
    net: DepthNet, bias: float, bound: float
) -> None:
    """Drive the last layer far out: without the y_range sigmoid the output would be ~bias."""
    net.eval()
    conv = _last_conv(net)
    assert conv.out_channels == 1 and conv.bias is not None
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.fill_(bias)
        log_depth = net(torch.rand(BATCH, 3, SPEC.height, SPEC.width))
    assert torch.allclose(log_depth, torch.full_like(log_depth, bound), atol=1e-4)


def test_depth_net__differs_per_image(net: DepthNet) -> None:
    """The batch dimension is not mixed up: each image's prediction depends on that image."""
    net.eval()
    image = torch.rand(
        BATCH, 3, SPEC.height, SPEC.width, generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        both = net(image)
        first_alone = net(image[:1])
    assert torch.allclose(both[:1], first_alone, atol=1e-5)
    assert not torch.allclose(both[0], both[1])


def _training_step(module: DepthModule, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """forward + loss + backward + optimizer step, as Lightning's automatic optimisation does;
    returns the loss."""
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Optimizer)
    optimizer.zero_grad()
    loss = module.training_step(batch, 0)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _parameters(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten().cpu() for p in module.parameters()])


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_depth_module__cpu_training_step_updates_weights() -> None:
    module = _module().train()
    before = _parameters(module)
    loss = _training_step(module, _batch())
    after = _parameters(module)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    assert torch.isfinite(after).all()
    assert not torch.equal(before, after)
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@needs_cuda
@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_depth_module__bf16_autocast_training_step_on_cuda() -> None:
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    module = _module().cuda().train()
    batch = {k: v.cuda() for k, v in _batch().items()}
    before = _parameters(module)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Optimizer)
    optimizer.zero_grad()
    conv_dtypes: list[torch.dtype] = []
    hook = _last_conv(module).register_forward_hook(
        lambda _m, _i, output: conv_dtypes.append(output.dtype)
    )
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = module.training_step(batch, 0)
    hook.remove()
    assert conv_dtypes == [torch.bfloat16]  # autocast really ran the network in bf16
    loss.backward()
    optimizer.step()
    torch.cuda.synchronize()
    after = _parameters(module)
    assert torch.isfinite(loss.float()) and loss.float() > 0
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    # bf16 has fp32's exponent range: no gradient overflows without loss scaling
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # the weights stay fp32 (mixed precision, not a bf16 model)
    assert all(p.dtype == torch.float32 for p in module.parameters())


def test_depth_module__frozen_encoder_stays_fixed_while_the_decoder_trains() -> None:
    """finetune.freeze_encoder: one optimiser step moves the decoder only, and the encoder's
    batch-norm statistics do not adapt to the batch either."""
    from depthpipe.model import DepthModule

    torch.manual_seed(0)
    spec = ModelSpec("resnet18", 32, 48, 0.6, 350.0)
    module = DepthModule(
        build_unet(build_resnet("resnet18"), spec),
        loss="l1_log",
        optimizer="adamw",
        lr=1e-3,
        schedule="constant",
        weight_decay=0.0,
        min_depth=0.6,
        max_depth=350.0,
        freeze_encoder=True,
    )
    module.train()
    assert not module.encoder().training and module.net.unet.layers[-1].training
    encoder_before = {k: v.clone() for k, v in module.encoder().state_dict().items()}
    encoder_ids = {id(p) for p in module.encoder().parameters()}
    decoder = [p for p in module.parameters() if id(p) not in encoder_ids]
    decoder_before = [p.clone() for p in decoder]
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Optimizer)
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not trained & encoder_ids and trained == {id(p) for p in decoder}
    batch = {
        "image": torch.rand(2, 3, 32, 48),
        "depth": torch.full((2, 1, 32, 48), 12.0),
        "mask": torch.ones(2, 1, 32, 48, dtype=torch.bool),
    }
    _, loss = module._loss(batch)
    assert loss is not None
    loss.backward()
    optimizer.step()
    for key, value in module.encoder().state_dict().items():
        assert torch.equal(value, encoder_before[key]), key  # weights and running statistics
    assert any(not torch.equal(a, b) for a, b in zip(decoder, decoder_before, strict=True))
