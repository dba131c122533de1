"""The network on tiny tensors: DynamicUnet on a ResNet-18, its output range, one training step;
the GPU code paths (channels_last, bf16 autocast) as far as a CPU runs them."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.hooks import RemovableHandle

from depthpipe.config import parse_params
from depthpipe.encoders import build_resnet
from depthpipe.hardware import ForwardMode, forward_mode
from depthpipe.model import (
    DepthNet,
    ModelSpec,
    build_unet,
    network_input,
    predict_depth,
    save_finetuned,
)
from depthpipe.training import DepthModule
from tests.helpers import committed_params

SPEC = ModelSpec(arch="resnet18", height=32, width=48, min_depth=0.6, max_depth=350.0)
LOG_RANGE = (math.log(SPEC.min_depth), math.log(SPEC.max_depth))
BATCH = 2
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CHANNELS_LAST = torch.channels_last
# bf16 keeps 8 significant bits (rounding 2^-9 = 0.2% per value); through the ~40 convolutions
# of the ResNet-18 U-Net that compounds to about 1% of the sigmoid's input, which the y_range
# head (slope at most 6.4/4) turns into log depth. Measured at 32x48 on CPU, three seeds: mean
# |bf16 - fp32| 0.009-0.014, max 0.043-0.070 (about 1-7% in depth). Bounds with 2x headroom;
# an output computed wrongly (another image, a missing layer) is off by ~0.5, the output's spread.
BF16_MEAN_LOG_ERROR = 0.03
BF16_MAX_LOG_ERROR = 0.15


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


def _first_conv_weight(net: nn.Module) -> torch.Tensor:
    """The encoder's 7x7 stem, (64, 3, 7, 7): its layout shows (the last conv's (1, C, 1, 1)
    weight is contiguous in either layout)."""
    return next(m for m in net.modules() if isinstance(m, nn.Conv2d)).weight


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
    from depthpipe.training import DepthModule

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


# -- GPU code paths on the CPU: channels_last layout and bf16 autocast ----------------------------


def _record_conv_dtype(net: nn.Module) -> tuple[list[torch.dtype], RemovableHandle]:
    """The dtype of the last convolution's output at each forward, and the hook recording it."""
    seen: list[torch.dtype] = []
    hook = _last_conv(net).register_forward_hook(lambda _m, _i, output: seen.append(output.dtype))
    return seen, hook


def _photos(count: int = BATCH) -> list[Image.Image]:
    """RGB photos at twice the spec's size: network_input shrinks them to it."""
    rng = np.random.default_rng(4)
    shape = (2 * SPEC.height, 2 * SPEC.width, 3)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(count)]


def test_depth_net__cpu_bf16_autocast_is_close_to_fp32(net: DepthNet) -> None:
    net.eval()
    image = network_input(_photos(), SPEC)  # (B, 3, h, w), NHWC-strided as in inference
    with torch.no_grad():
        fp32 = net(image)
        seen, hook = _record_conv_dtype(net)
        with forward_mode("cpu", "bf16-mixed").autocast():
            bf16 = net(image)
        hook.remove()
    assert seen == [torch.bfloat16]  # autocast really ran the network in bf16
    assert bf16.shape == fp32.shape == (BATCH, 1, SPEC.height, SPEC.width)
    assert bf16.dtype == torch.float32  # cast back for the losses and metrics
    error = (bf16 - fp32).abs()
    assert float(error.mean()) < BF16_MEAN_LOG_ERROR and float(error.max()) < BF16_MAX_LOG_ERROR
    assert LOG_RANGE[0] <= bf16.min() and bf16.max() <= LOG_RANGE[1]


def test_depth_net__channels_last_is_close_to_contiguous(net: DepthNet) -> None:
    """Both layouts forced: NCHW tensors through NCHW weights, NHWC through NHWC."""
    net.eval()
    image = torch.rand(
        BATCH, 3, SPEC.height, SPEC.width, generator=torch.Generator().manual_seed(5)
    )
    nhwc_net = copy.deepcopy(net).to(memory_format=CHANNELS_LAST)
    assert _first_conv_weight(nhwc_net).is_contiguous(memory_format=CHANNELS_LAST)
    with torch.no_grad():
        nchw = net(image.contiguous())
        nhwc = nhwc_net(image.contiguous(memory_format=CHANNELS_LAST))
    assert nhwc.shape == nchw.shape == (BATCH, 1, SPEC.height, SPEC.width)
    assert nhwc.dtype == torch.float32
    # another summation order only (measured: 9e-6 relative)
    torch.testing.assert_close(nhwc, nchw, rtol=1e-4, atol=0)


def test_predict_depth__default_cpu_path_is_the_plain_forward(net: DepthNet) -> None:
    """The CPU path evaluate has committed results from: the net on network_input as it is."""
    net.eval()
    photos = _photos()
    with torch.no_grad():
        plain = net(network_input(photos, SPEC))[:, 0].numpy()
    predictions = predict_depth(net, SPEC, photos)
    for one, expected in zip(predictions, plain, strict=True):
        assert one.log_depth.dtype == np.float32
        np.testing.assert_array_equal(one.log_depth, expected)


def test_predict_depth__channels_last_path_equals_the_default(net: DepthNet) -> None:
    """The CUDA layout (weights and input channels_last) run on the CPU gives the very same
    predictions: network_input's tensor is NHWC-strided, so oneDNN already runs every CPU
    convolution channels_last."""
    net.eval()
    photos = _photos()
    default = predict_depth(net, SPEC, photos)
    nhwc = ForwardMode(torch.device("cpu"), CHANNELS_LAST, autocast_dtype=None)
    nhwc_net = nhwc.place_module(copy.deepcopy(net))
    assert _first_conv_weight(nhwc_net).is_contiguous(memory_format=CHANNELS_LAST)
    for a, b in zip(default, predict_depth(nhwc_net, SPEC, photos, nhwc), strict=True):
        assert b.log_depth.dtype == np.float32 and b.log_depth.shape == (SPEC.height, SPEC.width)
        np.testing.assert_array_equal(a.log_depth, b.log_depth)


def test_predict_depth__cpu_bf16_gives_float32_close_to_fp32(net: DepthNet) -> None:
    net.eval()
    photos = _photos(1)
    fp32 = predict_depth(net, SPEC, photos)
    seen, hook = _record_conv_dtype(net)
    bf16 = predict_depth(net, SPEC, photos, forward_mode("cpu", "bf16-mixed"))
    hook.remove()
    assert seen == [torch.bfloat16]  # predict_depth entered the mode's autocast
    for a, b in zip(fp32, bf16, strict=True):
        assert b.log_depth.dtype == np.float32 and b.full().dtype == np.float32
        error = np.abs(a.log_depth - b.log_depth)
        assert error.mean() < BF16_MEAN_LOG_ERROR and error.max() < BF16_MAX_LOG_ERROR


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_depth_module__bf16_channels_last_training_step_on_cpu() -> None:
    """The CUDA fine-tuning path (channels_last weights and batches, bf16 autocast as Lightning's
    bf16-mixed applies it), run on the CPU: a finite float32 loss and finite fp32 gradients."""
    module = _module().train()
    module.use_memory_format(CHANNELS_LAST)
    batch = module.on_after_batch_transfer(_batch(32, 32), 0)  # 32x32: bf16 is slow on CPUs
    assert batch["image"].is_contiguous(memory_format=CHANNELS_LAST)
    assert _first_conv_weight(module).is_contiguous(memory_format=CHANNELS_LAST)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Optimizer)
    seen, hook = _record_conv_dtype(module)
    with forward_mode("cpu", "bf16-mixed").autocast():
        loss = module.training_step(batch, 0)
    hook.remove()
    assert seen == [torch.bfloat16]
    assert loss.dtype == torch.float32 and loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert len(grads) == len(list(module.parameters()))
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    before = _parameters(module)
    optimizer.step()
    after = _parameters(module)
    assert torch.isfinite(after).all() and not torch.equal(before, after)


def test_depth_module__cpu_trainer_keeps_layouts() -> None:
    """setup under a CPU Trainer changes no layout and on_after_batch_transfer passes the very
    same image tensor: fine-tuning on the CPU runs exactly as before channels_last existed."""
    module = _module()
    storage = _first_conv_weight(module).data_ptr()
    module.trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    module.setup("fit")
    assert module.memory_format == torch.preserve_format
    weight = _first_conv_weight(module)
    assert weight.data_ptr() == storage and weight.is_contiguous()  # untouched, NCHW
    batch = _batch()
    image = batch["image"]
    assert module.on_after_batch_transfer(batch, 0)["image"] is image


def test_save_finetuned__channels_last_weights_are_written_contiguous(
    net: DepthNet, tmp_path: Path
) -> None:
    """model.pt does not depend on the layout training used; the values are the network's."""
    nhwc_net = copy.deepcopy(net).to(memory_format=CHANNELS_LAST)
    assert not _first_conv_weight(nhwc_net).is_contiguous()
    save_finetuned(nhwc_net, SPEC, tmp_path)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(tensor.is_contiguous() for tensor in saved.values())
    original = net.state_dict()
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[key], original[key]) for key in saved)


@needs_cuda
def test_depth_module__cuda_trainer_makes_weights_and_batches_channels_last() -> None:
    module = _module()
    module.trainer = pl.Trainer(accelerator="gpu", devices=1, logger=False)
    module.setup("fit")
    assert module.memory_format == CHANNELS_LAST
    module.cuda()
    assert _first_conv_weight(module).is_contiguous(memory_format=CHANNELS_LAST)
    batch = module.on_after_batch_transfer({k: v.cuda() for k, v in _batch().items()}, 0)
    assert batch["image"].is_contiguous(memory_format=CHANNELS_LAST)


@needs_cuda
def test_predict_depth__cuda_forward_mode_matches_cpu(net: DepthNet) -> None:
    net.eval()
    photos = _photos()
    cpu = predict_depth(net, SPEC, photos)
    precision = (
        "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "32-true"
    )
    mode = forward_mode("cuda", precision)
    gpu = predict_depth(mode.place_module(copy.deepcopy(net)), SPEC, photos, mode)
    for a, b in zip(cpu, gpu, strict=True):
        assert b.log_depth.dtype == np.float32
        error = np.abs(a.log_depth - b.log_depth)
        assert error.mean() < BF16_MEAN_LOG_ERROR and error.max() < BF16_MAX_LOG_ERROR
