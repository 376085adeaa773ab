"""Training a member and predicting with it, on tiny synthetic images (CPU, seconds)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from fusion_engine import FusionEngineError, InputConfig  # noqa: E402
from fusion_engine.spec import TrainSpec  # noqa: E402
from fusion_engine.training import augment, predict_logits, resolve_device, train_member  # noqa: E402

SIZE = 8
CFG = InputConfig(size=SIZE, mean=(0.5,), std=(0.25,), in_chans=1)


def quadrant_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes: a bright blob in one quadrant of a noisy dark image. Easy to separate."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randint(0, 60, (n, 1, SIZE, SIZE), generator=gen)
    half = SIZE // 2
    for k in range(4):
        r, c = divmod(k, 2)
        x[y == k, :, r * half:(r + 1) * half, c * half:(c + 1) * half] += 150
    return x.to(torch.uint8), y


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * (SIZE // 2) ** 2, 4),
    )


@pytest.fixture(scope="module")
def data():
    x_train, y_train = quadrant_images(64, seed=0)
    x_val, y_val = quadrant_images(32, seed=1)
    return x_train, y_train, x_val, y_val


def fit(data, seed: int = 0, quiet: bool = True, module: nn.Module | None = None, **train):
    torch.manual_seed(seed)
    module = module or tiny_cnn()
    spec = TrainSpec(**{"epochs": 4, "batch_size": 16, "lr": 0.02, **train})
    return module, train_member(module, CFG, spec, *data, seed=seed, device="cpu", label="tiny", quiet=quiet)


def without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_loss_decreases_and_the_easy_task_is_learnt(data):
    _, result = fit(data, epochs=5)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert result.history[-1]["val_accuracy"] == 1.0
    assert set(result.history[0]) == {"epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds"}
    assert result.train_seconds > 0 and result.images_per_second > 0


def test_same_seed_gives_the_same_history_weights_and_predictions(data):
    m1, r1 = fit(data, seed=3)
    m2, r2 = fit(data, seed=3)
    assert without_seconds(r1.history) == without_seconds(r2.history)
    assert all(torch.equal(r1.state_dict[k], r2.state_dict[k]) for k in r1.state_dict)
    p1 = predict_logits(m1, CFG, data[2], batch_size=7, device="cpu")
    p2 = predict_logits(m2, CFG, data[2], batch_size=7, device="cpu")
    np.testing.assert_array_equal(p1, p2)


def test_another_seed_trains_differently(data):
    _, r1 = fit(data, seed=3)
    _, r2 = fit(data, seed=4)
    assert without_seconds(r1.history) != without_seconds(r2.history)


def test_the_best_epoch_has_the_lowest_val_loss_and_its_weights_are_kept(data):
    module, result = fit(data, epochs=5, lr=0.05)
    val_losses = [h["val_loss"] for h in result.history]
    assert result.best_epoch == int(np.argmin(val_losses)) + 1
    module.load_state_dict(result.state_dict)
    logits = torch.from_numpy(predict_logits(module, CFG, data[2], batch_size=32, device="cpu"))
    loss = nn.functional.cross_entropy(logits, data[3]).item()
    assert loss == pytest.approx(val_losses[result.best_epoch - 1], rel=1e-5)
    assert all(v.device.type == "cpu" for v in result.state_dict.values())


def test_lr_warms_up_then_decays_with_cosine(data):
    _, result = fit(data, epochs=4, warmup_epochs=1, lr=0.01)
    lrs = [h["lr"] for h in result.history]
    assert lrs[0] == pytest.approx(0.01)
    assert lrs[0] > lrs[1] > lrs[2] > lrs[3] > 0


class Constant(nn.Module):
    """Logits that ignore the input: the val loss never improves after epoch 1."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return self.bias.expand(len(x), 4) * 0.0 + x.mean() * 0.0


def test_patience_stops_once_the_val_loss_stops_improving(data):
    _, result = fit(data, module=Constant(), epochs=10, patience=2)
    assert result.best_epoch == 1
    assert len(result.history) == 3


def test_sgd_trains_too(data):
    _, result = fit(data, optimizer="sgd", epochs=3)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_a_timm_resnet18_trains_on_16px_images():
    from fusion_engine_timm import BackboneParams, build_model

    x, y = quadrant_images(40, seed=0)
    x = nn.functional.interpolate(x.float(), size=16).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    torch.manual_seed(0)
    built = build_model("resnet18", BackboneParams(), num_classes=4, image_size=16)
    cfg = built.input
    result = train_member(built.module, cfg, TrainSpec(epochs=2, batch_size=20), x, y, x[:20], y[:20], seed=0,
                          device="cpu", quiet=True)
    assert len(result.history) == 2 and result.best_epoch in (1, 2)
    assert predict_logits(built.module, cfg, x[:5], batch_size=2, device="cpu").shape == (5, 4)


def test_predict_logits_are_float32_per_sample_and_class(data):
    module, _ = fit(data, epochs=1)
    logits = predict_logits(module, CFG, data[2][:10], batch_size=3, device="cpu")
    assert logits.shape == (10, 4) and logits.dtype == np.float32
    assert not module.training


def test_prediction_halves_its_batch_until_it_fits_in_device_memory(data, caplog):
    """A device that runs out of memory above 8 images a batch: the logits are those of batch 8."""
    module, _ = fit(data, epochs=1)

    class SmallDevice(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.batches = []

        def forward(self, x):
            self.batches.append(len(x))
            if len(x) > 8:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return self.inner(x)

    small = SmallDevice(module)
    with caplog.at_level("WARNING", logger="fusion_engine"):
        logits = predict_logits(small, CFG, data[2], batch_size=32, device="cpu")
    np.testing.assert_allclose(logits, predict_logits(module, CFG, data[2], batch_size=8, device="cpu"), rtol=1e-6)
    assert small.batches == [32, 16, 8, 8, 8, 8]
    assert "batch size lowered to 16" in caplog.text and "batch size lowered to 8" in caplog.text


def test_training_falls_back_to_the_plain_optimizer_where_torch_has_no_fused_kernel(data, monkeypatch):
    """Older torch, or a device without one: the fused attempt marks the groups, then fails."""
    class NoFusedAdamW(torch.optim.AdamW):
        def __init__(self, params, *args, fused=None, **kwargs):
            params = list(params)
            if fused or any(group.get("fused") for group in params):
                for group in params:
                    group["fused"] = True  # what torch's Optimizer.__init__ does before it checks
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
            super().__init__(params, *args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", NoFusedAdamW)
    reference = fit(data, epochs=2)[1]
    assert reference.best_epoch in (1, 2) and all(np.isfinite(h["train_loss"]) for h in reference.history)


def test_quiet_prints_nothing(data, capsys):
    fit(data, epochs=1, quiet=True)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_progress_goes_to_stderr_only(data, capsys):
    fit(data, epochs=1, quiet=False)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "tiny epochs" in captured.err


def test_images_of_the_wrong_shape_are_refused(data):
    x_train, y_train, x_val, y_val = data
    with pytest.raises(FusionEngineError, match="uint8"):
        train_member(tiny_cnn(), CFG, TrainSpec(epochs=1), x_train.float(), y_train, x_val, y_val, seed=0, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_an_error(data):
    with pytest.raises(FusionEngineError, match="CUDA is not available"):
        train_member(tiny_cnn(), CFG, TrainSpec(epochs=1), *data, seed=0, device="cuda", quiet=True)
    with pytest.raises(FusionEngineError, match="CUDA is not available"):
        resolve_device("cuda")


def test_auto_device_is_cpu_without_cuda():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_unknown_device_is_an_error():
    with pytest.raises(FusionEngineError, match="unknown device 'tpu0'"):
        resolve_device("tpu0")


# -- augmentation ---------------------------------------------------------------------------------

def shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``image`` moved by (dy, dx) with zeros coming in."""
    out = torch.zeros_like(image)
    h, w = image.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = image[..., max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def test_augment_translates_each_image_by_at_most_shift_pixels():
    x = torch.randint(1, 255, (32, 3, 8, 8), dtype=torch.uint8)
    out = augment(x, 2, False, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    moves = set()
    for image, moved in zip(x, out):
        match = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if torch.equal(shifted(image, dy, dx), moved)]
        assert len(match) == 1
        moves.add(match[0])
    assert len(moves) > 5


def test_augment_flips_some_images_horizontally():
    x = torch.randint(0, 255, (32, 1, 6, 6), dtype=torch.uint8)
    out = augment(x, 0, True, torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, i.flip(-1)) for i, o in zip(x, out)]
    kept = [torch.equal(o, i) for i, o in zip(x, out)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 0 < sum(flipped) < 32


def test_augment_without_shift_or_flip_is_the_identity():
    x = torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(augment(x, 0, False, torch.Generator()), x)
