"""Tests of the tiny-prior training data, building blocks and the training / sampling scripts."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from g2d2.train import cli as train_cli
from g2d2.train import models as T
from g2d2.train import samples, trainset

# ------------------------------------------------------------------------------------------------ data


def test_dead_leaves_deterministic_shape_range():
    def draw(seed: int) -> torch.Tensor:
        return trainset.dead_leaves(3, 32, torch.Generator().manual_seed(seed), num_shapes=24, chunk=8)

    a, b, c = draw(0), draw(0), draw(1)
    assert a.shape == (3, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.min() >= -1 and a.max() <= 1 and torch.isfinite(a).all()
    assert a.std() > 0.05  # not a flat image


def test_dead_leaves_single_colour_palette():
    # with one palette colour every shape and the background share it; textures are grey (added to all
    # channels), so wherever nothing is clipped the channel differences are those of the colour
    g = torch.Generator().manual_seed(0)
    palette = torch.tensor([[0.3, -0.2, 0.1]])
    x = trainset.dead_leaves(2, 32, g, palette=palette, num_shapes=20, chunk=8, blur_max=0.0, noise_max=0.0)
    inside = (x.abs() < 1).all(1)
    assert inside.float().mean() > 0.9
    assert torch.allclose((x[:, 0] - x[:, 1])[inside], torch.tensor(0.5), atol=1e-5)
    assert torch.allclose((x[:, 2] - x[:, 1])[inside], torch.tensor(0.3), atol=1e-5)


def test_split_is_disjoint_and_enforced():
    held = set(trainset.HELD_OUT_IMAGE_NAMES)
    assert held == {"astronaut", "chelsea", "coffee", "rocket"}
    assert held.isdisjoint(trainset.TRAINING_IMAGE_NAMES)
    try:  # the lead's evaluation list, once it exists, must be the same
        from g2d2.data import EVAL_IMAGE_NAMES
    except ImportError:
        EVAL_IMAGE_NAMES = None
    if EVAL_IMAGE_NAMES is not None:
        assert set(EVAL_IMAGE_NAMES) == held
    for name in held:
        with pytest.raises(ValueError, match="held-out"):
            trainset.load_image(name)
    with pytest.raises(ValueError, match="unknown image"):
        trainset.load_image("not_an_image")
    # no training source has the pixels of an evaluation image
    held_px = {trainset.load_image(n, allow_held_out=True).tobytes() for n in held}
    for name in trainset.TRAINING_RGB_NAMES + trainset.TRAINING_GREY_NAMES:
        assert trainset.load_image(name).tobytes() not in held_px


def test_image_bank_crops_are_dihedral_copies_at_native_scale():
    img = torch.linspace(-1, 1, 3 * 64 * 64).reshape(3, 64, 64)
    bank = trainset.ImageBank([img], [1.0], 64)
    crops = bank.sample(16, torch.Generator().manual_seed(0))
    variants = []
    for k in range(4):
        r = torch.rot90(img, k, (1, 2))
        variants += [r, r.flip(2)]
    seen = set()
    for c in crops:
        match = [i for i, v in enumerate(variants) if torch.allclose(c, v, atol=1e-5)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) > 3  # augmentations are actually used


def test_image_bank_large_scale_uses_pyramid():
    img = torch.rand(3, 512, 512) * 2 - 1
    bank = trainset.ImageBank([img], [1.0], 64)
    assert bank.num_levels.tolist() == [4]  # 512, 256, 128, 64
    assert torch.allclose(bank.pixels[:, 512 * 512:512 * 512 + 256 * 256].reshape(3, 256, 256),
                          torch.nn.functional.avg_pool2d(img[None], 2)[0], atol=1e-6)


@pytest.fixture(scope="module")
def training_images() -> trainset.TrainingImages:
    return trainset.TrainingImages(64, "cpu", 0.5, palette_size=256,
                                    dead_leaves_kwargs=dict(num_shapes=16, chunk=16))


def test_training_images_mix(training_images):
    x = training_images.sample(4, torch.Generator().manual_seed(3))
    y = training_images.sample(4, torch.Generator().manual_seed(3))
    assert x.shape == (4, 3, 64, 64) and torch.equal(x, y)
    assert x.min() >= -1 and x.max() <= 1
    assert training_images.palette.shape == (256, 3)


def test_permute_channels_reorders_each_images_channels(training_images):
    """Same images as without the option (same generator), each with one of the 6 RGB orders."""
    x = training_images.sample(12, torch.Generator().manual_seed(4))
    permuted = trainset.TrainingImages(64, "cpu", 0.5, palette_size=256, permute_channels=True,
                                        dead_leaves_kwargs=dict(num_shapes=16, chunk=16))
    y = permuted.sample(12, torch.Generator().manual_seed(4))
    orders = []
    for a, b in zip(x, y, strict=True):
        match = [p for p in itertools.permutations(range(3)) if torch.equal(a[list(p)], b)]
        assert match
        orders.append(match[0])
    assert len(set(orders)) > 1  # not one fixed order for the whole batch


def test_held_out_crops_fixed():
    a, b = trainset.held_out_crops(6, 64, seed=5), trainset.held_out_crops(6, 64, seed=5)
    assert a.shape == (6, 3, 64, 64) and torch.equal(a, b)
    assert trainset.held_out_whole_images(64).shape == (4, 3, 64, 64)


# ----------------------------------------------------------------------------------- building blocks


def test_q_sample_tokens_matches_vq_diffusion_marginals():
    from diffusers import VQDiffusionScheduler

    k, t = 10, 40
    sched = VQDiffusionScheduler(num_vec_classes=k + 1, num_train_timesteps=100)
    m = T.vq_diffusion_marginals(sched)
    alpha, beta, gamma = m[t].tolist()
    assert alpha + k * beta + gamma == pytest.approx(1.0, abs=1e-5)
    z0 = torch.full((2, 20000), 3)
    zt = T.q_sample_tokens(z0, torch.full((2,), t), m, k, torch.Generator().manual_seed(0))
    n = zt.numel()
    tol = 5 * (0.25 / n) ** 0.5
    assert (zt == k).float().mean().item() == pytest.approx(gamma, abs=tol)
    assert (zt == 3).float().mean().item() == pytest.approx(alpha + beta, abs=tol)
    assert (zt == 7).float().mean().item() == pytest.approx(beta, abs=tol)


def _tiny_transformer(k: int = 12):
    from diffusers import Transformer2DModel

    torch.manual_seed(0)
    return Transformer2DModel(**T.transformer_config(k, 4, tiny=True)).eval()


def test_per_sample_timesteps_equal_scalar_forward():
    k = 12
    model = _tiny_transformer(k)
    # make the timestep embedding matter (AdaLayerNorm linear layers start at zero output otherwise)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    tokens = torch.randint(0, k + 1, (4, 16), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 3, 70, 70])
    ref = torch.cat([model(tokens[:2], timestep=torch.tensor(3)).sample,
                     model(tokens[2:], timestep=torch.tensor(70)).sample])  # (B, K, N)
    T.enable_per_sample_timesteps(model)
    got = torch.log_softmax(T.transformer_logits(model, tokens, t).double(), -1).permute(0, 2, 1)
    assert torch.allclose(got.float(), ref, atol=1e-5)
    # the patched model still gives the diffusers output for a scalar timestep
    assert torch.allclose(model(tokens[:2], timestep=torch.tensor(3)).sample, ref[:2], atol=1e-6)
    assert not torch.allclose(ref[:2], ref[2:])


def test_vq_quantize_matches_diffusers_quantizer():
    from diffusers import VQModel

    torch.manual_seed(0)
    vq = VQModel(**T.vq_config(tiny=True)).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    z = T.vq_encode_latents(vq, x)
    assert z.shape == (2, 8, 32, 32)  # f = 2
    T.init_codebook(vq, z, torch.Generator().manual_seed(0))
    z_q, codes, ids = T.vq_quantize(vq, z)
    ref_q, _, (_, _, ref_ids) = vq.quantize(z)
    assert torch.equal(ids.reshape(-1), ref_ids.reshape(-1))
    assert torch.allclose(z_q, ref_q, atol=1e-6)
    # dead-code restart: unused codes are replaced by encoder outputs, used ones untouched
    r = T.DeadCodeRestarter(64, torch.device("cpu"), decay=0.0)
    r.update(ids)
    before = vq.quantize.embedding.weight.detach().clone()
    dead = r.restart(vq, z, torch.Generator().manual_seed(1))
    used = torch.zeros(64, dtype=torch.bool)
    used[ids.unique()] = True
    assert torch.equal(dead, ~used)
    after = vq.quantize.embedding.weight.detach()
    assert torch.equal(after[used], before[used])
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    assert all((flat == row).all(1).any() for row in after[dead])


def test_lr_factor():
    assert T.lr_factor(0, 0.0, warmup_steps=10) == pytest.approx(0.1)
    assert T.lr_factor(99, 0.0) == pytest.approx(0.5)
    assert T.lr_factor(10_000, 0.0) == pytest.approx(1.0)
    assert T.lr_factor(10_000, 1.0, final=0.1) == pytest.approx(0.1)


# -------------------------------------------------------------------------------------------- scripts


def _smoke_args(out: Path, work: Path, stage: str, minutes: float) -> list[str]:
    return ["--stage", stage, "--tiny", "--device", "cpu", "--out", str(out), "--work-dir", str(work),
            "--minutes-vq", str(minutes), "--minutes-transformer", str(minutes), "--minutes-ddpm", str(minutes),
            "--log-every-s", "1", "--eval-every-s", "1000", "--save-every-s", "1000", "--num-eval", "8"]


def test_train_and_sample_smoke(tmp_path):
    from diffusers import DDPMScheduler, Transformer2DModel, UNet2DModel, VQDiffusionScheduler, VQModel

    train = train_cli
    out, work = tmp_path / "weights", tmp_path / "work"
    with pytest.raises(FileNotFoundError, match="--stage vq first"):
        train.main(_smoke_args(out, work, "transformer", 0.01))
    reports = train.main(_smoke_args(out, work, "all", 0.02))
    assert set(reports) == {"vq", "transformer", "ddpm"}
    kw = dict(low_cpu_mem_usage=False)
    vq = VQModel.from_pretrained(out / "tiny_vq" / "vqvae", **kw)
    tr = Transformer2DModel.from_pretrained(out / "tiny_vq" / "transformer", **kw)
    VQModel.from_pretrained(out / "tiny_vq", subfolder="vqvae", **kw)
    sched = VQDiffusionScheduler.from_pretrained(out / "tiny_vq" / "scheduler")
    assert tr.config.num_vector_embeds == vq.config.num_vq_embeddings + 1 == sched.config.num_vec_classes
    assert tr.config.sample_size == 32 and tr.config.norm_type == "ada_norm"  # f = 2 at 64 px
    UNet2DModel.from_pretrained(out / "tiny_ddpm" / "unet", **kw)
    ddpm = DDPMScheduler.from_pretrained(out / "tiny_ddpm" / "scheduler")
    assert ddpm.config.num_train_timesteps == 1000 and ddpm.config.beta_schedule == "linear"
    for sub in ("tiny_vq/vqvae", "tiny_vq/transformer", "tiny_ddpm/unet"):
        weights = load_file(out / sub / "diffusion_pytorch_model.safetensors")
        assert {v.dtype for v in weights.values()} == {torch.float16}
        report = json.loads((out / sub / "training_report.json").read_text())
        assert report["steps"] >= 1 and report["images_seen"] == report["steps"] * report["batch_size"]
        assert report["held_out"]
    assert "psnr_crops" in reports["vq"]["held_out"] and "ce_t5" in reports["transformer"]["held_out"]

    # resume continues the step counter (the budget is the total over resumes)
    steps, minutes = reports["vq"]["steps"], reports["vq"]["train_minutes"]
    again = train.main(_smoke_args(out, work, "vq", minutes + 0.01) + ["--resume"])["vq"]
    assert again["steps"] > steps
    assert again["history"][0]["step"] <= steps  # history carried over

    sample = samples
    written = sample.main(["--weights", str(out), "--device", "cpu", "--num", "2", "--ddpm-steps", "5",
                           "--out-dir", str(tmp_path / "docs")])
    for path in written.values():
        assert path.is_file() and path.stat().st_size > 0


def test_vq_decoder_only_keeps_the_tokens(tmp_path):
    """--vq-decoder-only trains the decoder of an exported VQ-VAE and leaves encoder, quant_conv and
    codebook bit-identical, so every image keeps its tokens (a transformer trained on them stays valid)."""
    from diffusers import VQModel

    train = train_cli
    out = tmp_path / "weights"
    train.main(_smoke_args(out, tmp_path / "work", "vq", 0.01))
    folder = out / "tiny_vq" / "vqvae"
    before = VQModel.from_pretrained(folder, **T.LOAD_KWARGS).eval()
    train.main(_smoke_args(out, tmp_path / "work2", "vq", 0.01) + ["--vq-decoder-only"])
    after = VQModel.from_pretrained(folder, **T.LOAD_KWARGS).eval()
    a, b = before.state_dict(), after.state_dict()
    frozen = [k for k in a if not k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and all(torch.equal(a[k], b[k]) for k in frozen)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("decoder."))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(T.vq_reconstruct(before, x)[1], T.vq_reconstruct(after, x)[1])
    with pytest.raises(FileNotFoundError, match="--stage vq first"):
        train.main(_smoke_args(tmp_path / "empty", tmp_path / "work3", "vq", 0.01) + ["--vq-decoder-only"])


def test_transformer_continue_starts_from_the_exported_transformer(tmp_path):
    """--transformer-continue loads <out>/tiny_vq/transformer: with a zero learning rate the exported
    weights come back unchanged (a random start would not), and without a trained one it says what to run."""
    from safetensors.torch import load_file

    train = train_cli
    out = tmp_path / "weights"
    train.main(_smoke_args(out, tmp_path / "work", "vq,transformer", 0.01))
    path = out / "tiny_vq" / "transformer" / "diffusion_pytorch_model.safetensors"
    before = load_file(path)
    train.main(_smoke_args(out, tmp_path / "work2", "transformer", 0.01)
               + ["--transformer-continue", "--lr-transformer", "0"])
    after = load_file(path)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # the shipped config must not record the folder it was continued from
    assert "_name_or_path" not in json.loads((path.parent / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="--stage transformer first"):
        empty = tmp_path / "only_vq"
        train.main(_smoke_args(empty, tmp_path / "work3", "vq", 0.01))
        train.main(_smoke_args(empty, tmp_path / "work4", "transformer", 0.01) + ["--transformer-continue"])


def test_loop_resume_and_nan_rollback(tmp_path, monkeypatch):
    """The shared loop on a toy model: a NaN loss rolls back to the last saved state with half the lr,
    and --resume continues step, images and the data generator state."""
    from g2d2.train.loop import Stage

    train = train_cli

    class Toy(Stage):
        name = "ddpm"

        def build(self):
            torch.manual_seed(0)
            self.model = torch.nn.Linear(4, 1)
            self.opt = self.optimizer(self.model.parameters())
            self.calls = 0
            return dict(model=self.model, opt=self.opt)

        def step(self, step, frac):
            self.calls += 1
            x = torch.randn(8, 4, generator=self.generator)
            loss = self.model(x).pow(2).mean()
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            if self.calls == 30:  # one bad step after the first saves
                return dict(loss=loss * float("nan"))
            return dict(loss=loss)

        def evaluate(self, model=None):
            return {}

        def export(self):
            self.report_folder = tmp_path / "out"
            return {"w": float(self.model.weight.detach().sum())}

    args = train.parse_args(["--stage", "ddpm", "--device", "cpu", "--work-dir", str(tmp_path / "work"),
                             "--minutes-ddpm", "0.05", "--log-every-s", "0", "--save-every-s", "0",
                             "--lr-ddpm", "0.01", "--batch-size", "8"])
    monkeypatch.setattr(time, "time", _fake_clock(step_s=0.01))  # deterministic budget: ~5 calls per step
    first = Toy(args, torch.device("cpu"))
    report = first.run()
    assert first.lr == pytest.approx(0.005)  # rolled back once
    assert report["steps"] == len(report["history"]) and np.isfinite(report["held_out"]["w"])
    assert report["steps"] < first.calls  # the bad step and the one before it were undone
    args.minutes_ddpm, args.resume = 0.1, True
    second = Toy(args, torch.device("cpu"))
    again = second.run()
    assert again["steps"] > report["steps"] and again["images_seen"] == 8 * again["steps"]


def _fake_clock(step_s: float):
    t = [1000.0]

    def clock() -> float:
        t[0] += step_s
        return t[0]

    return clock
