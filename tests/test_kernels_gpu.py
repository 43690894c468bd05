"""GPU checks of the Triton and CUDA backends (marked gpu: skipped without a CUDA device).

- noise and the clipped sum bit for bit across torch (on the GPU), C++ CPU, CUDA and Triton;
- the fused update kernels against torch.optim;
- the Triton conv weight gradient against cuDNN per sample on U-Net-sized layers;
- the whole engine on a small 3D U-Net with backend="triton" / "cuda" against the float64
  microbatch oracle (fp32 on the GPU with TF32 off: rtol 1e-4 on the update, stated below).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dpseg
from dpseg.ops import BACKENDS, clip_accumulate_noise, gaussian_noise, per_sample_sq_norms
from dpseg.privacy.rules import conv_weight_grad as cwg
from tests import triton_env
from tests.oracle import dp_sum, per_sample_grads
from tests.triton_env import kernel

triton_device = triton_env.triton_device  # the module's device fixture
no_tf32 = triton_env.no_tf32

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("no_tf32")]
GPU_BACKENDS = ["triton", "cuda"]


def _need(backend):
    if backend not in BACKENDS:
        pytest.skip(f"backend {backend!r} not built here")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("draws", [1, 3, 4])  # 1: paired lanes, odd offsets; 4: whole blocks
def test_noise_and_clip_bitwise_across_backends(triton_device, backend, draws):
    _need(backend)
    z_gpu = gaussian_noise(1_000_003, 2**64 - 5, 17, 999, draws, torch.float64, "cuda",
                           backend=backend)  # fmt: skip
    z_cpu = gaussian_noise(1_000_003, 2**64 - 5, 17, 999, draws, torch.float64, "cpu")
    assert torch.equal(z_gpu.cpu(), z_cpu)
    g = torch.Generator().manual_seed(0)
    shapes = [(32, 16, 3, 3, 3), (32,), (1,), (), (7, 5), (64, 32, 2, 2, 2)]
    grads = [torch.randn(4, *s, generator=g) for s in shapes]
    grads[3] = grads[3].double()
    c = torch.rand(4, dtype=torch.float64, generator=g)
    args = (1.1, 0.25, 123456789, 5, draws)
    want = clip_accumulate_noise(grads, c, *args)  # cpp (or torch) on the CPU
    got = clip_accumulate_noise([t.cuda() for t in grads], c.cuda(), *args, backend=backend)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want, strict=True))
    torch.testing.assert_close(
        per_sample_sq_norms([t.cuda() for t in grads], backend=backend).cpu(),
        per_sample_sq_norms(grads), rtol=1e-13, atol=0,
    )  # fmt: skip


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_fused_updates_cuda_and_triton_match_torch_optim(triton_device, optimizer):
    update = kernel("clip_noise_update")
    g = torch.Generator().manual_seed(1)
    shapes = [(64, 32, 3, 3, 3), (64,), (5,)]
    grads = [torch.randn(3, *s, generator=g).cuda() for s in shapes]
    c = torch.rand(3, dtype=torch.float64, generator=g).cuda()
    params = [torch.randn(s, generator=g).cuda() for s in shapes]
    states = [[torch.rand(s, generator=g).cuda() * 0.01 for s in shapes] for _ in range(2)]
    copies = [[[t.clone() for t in ts] for ts in (params, *states)] for _ in range(3)]
    kw = dict(noise_std=0.7, scale=0.25, seed=5, step=3)
    if optimizer == "sgd":
        h = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=True)
        update.clip_noise_sgd_reference(copies[0][0], grads, copies[0][1], c, **kw, **h)
        update.clip_noise_sgd_(copies[1][0], grads, copies[1][1], c, **kw, **h)
        if "cuda" in BACKENDS:
            torch.ops.dpseg.clip_accumulate_noise_sgd_(
                copies[2][0], copies[2][1], grads, c, 0.7, 0.25, 5, 3, 1,
                [0, 55296, 55360], 0.1, 0.9, 0.1, 0.01, True, False, False,
            )  # fmt: skip
    else:
        h = dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=optimizer == "adamw",
                 optimizer_step=2)  # fmt: skip
        update.clip_noise_adam_reference(*copies[0][:1], grads, *copies[0][1:], c, **kw, **h)
        update.clip_noise_adam_(copies[1][0], grads, *copies[1][1:], c, **kw, **h)
        if "cuda" in BACKENDS:
            torch.ops.dpseg.clip_accumulate_noise_adam_(
                copies[2][0], copies[2][1], copies[2][2], grads, c, 0.7, 0.25, 5, 3, 1,
                [0, 55296, 55360], 0.01, 0.9, 0.999, 1e-8, 0.1, optimizer == "adamw", False, 2,
            )  # fmt: skip
    for other in copies[1:] if "cuda" in BACKENDS else copies[1:2]:
        for a, b in zip(sum(other, []), sum(copies[0], []), strict=True):
            torch.testing.assert_close(a, b, rtol=4e-7, atol=6e-8)


@pytest.mark.parametrize(
    "cin,cout,size,transposed",
    [(1, 32, 64, False), (32, 32, 64, False), (128, 128, 16, False), (64, 32, 16, True)],
)
def test_conv_weight_grad_matches_cudnn(triton_device, cin, cout, size, transposed):
    conv = kernel("conv_weight_grad")
    x = torch.randn(2, cin, size, size, size, device="cuda")
    if transposed:
        w = torch.randn(cin, cout, 2, 2, 2, device="cuda")
        geometry = ([2] * 3, [0] * 3, [1] * 3, True, [0] * 3, 1)
    else:
        w = torch.randn(cout, cin, 3, 3, 3, device="cuda")
        geometry = ([1] * 3, [1] * 3, [1] * 3, False, [0] * 3, 1)
    go = torch.randn_like(torch.ops.aten.convolution(x, w, None, *geometry))
    got, norms = conv.per_sample_conv_weight_grad(go, x, w, *geometry, want_norms=True)
    want = conv.per_sample_conv_weight_grad_reference(go, x, w, *geometry)
    scale = want.abs().max()
    torch.testing.assert_close(got / scale, want / scale, rtol=0, atol=1e-5)
    torch.testing.assert_close(norms, want.double().flatten(1).square().sum(1), rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_engine_on_a_3d_unet_matches_the_float64_oracle(triton_device, backend):
    _need(backend)
    from dpseg.models.unet import UNet

    torch.manual_seed(0)
    model = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32))
    x = torch.randn(3, 1, 16, 16, 16)
    y = torch.randint(0, 2, (3, 16, 16, 16))
    per_sample = per_sample_grads(model.double(), F.cross_entropy, x.double(), y)
    norms, summed = dp_sum(per_sample, 1.0)
    gpu_model = copy.deepcopy(model).float().cuda()
    before = copy.deepcopy(gpu_model)
    loader = DataLoader(TensorDataset(torch.zeros(6, 1, 16, 16, 16)), batch_size=3)
    opt = torch.optim.SGD(gpu_model.parameters(), lr=1.0)
    pm, popt, _ = dpseg.PrivacyEngine(accountant="rdp").make_private(
        module=gpu_model, optimizer=opt, data_loader=loader, noise_multiplier=0.0,
        max_grad_norm=1.0, poisson_sampling=False, backend=backend,
    )  # fmt: skip
    strategy = cwg.force_strategy("triton") if backend == "triton" else _null()
    with strategy:
        F.cross_entropy(pm(x.cuda()), y.cuda()).backward()
    popt.step()
    torch.testing.assert_close(popt.last_per_sample_norms.cpu(), norms, rtol=1e-4, atol=0)
    expected = torch.cat([summed[n].flatten() / 3 for n, _ in model.named_parameters()])
    got = torch.cat([(b - a).detach().flatten().double().cpu() for a, b in
                     zip(gpu_model.parameters(), before.parameters(), strict=True)])  # fmt: skip
    assert (got - expected).abs().max() / expected.abs().max() < 1e-4


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False
