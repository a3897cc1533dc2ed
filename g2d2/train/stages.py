"""The three training stages of the tiny priors: VQ-VAE, token transformer (VQ-Diffusion), pixel DDPM.

Output layout (fp16 safetensors, loadable with the diffusers classes' `from_pretrained`):
  <out>/tiny_vq/vqvae/        VQModel               + training_report.json
  <out>/tiny_vq/transformer/  Transformer2DModel    + training_report.json
  <out>/tiny_vq/scheduler/    VQDiffusionScheduler (K + 1 classes, T = 100)
  <out>/tiny_ddpm/unet/       UNet2DModel (EMA)     + training_report.json
  <out>/tiny_ddpm/scheduler/  DDPMScheduler (linear betas 1e-4..0.02, T = 1000, epsilon)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from g2d2.experiment.metrics import psnr
from g2d2.priors.base import freeze
from g2d2.train import models as T
from g2d2.train import trainset
from g2d2.train.loop import Stage, TensorState

TRANSFORMER_EVAL_FRACTIONS = (0.1, 0.5, 0.9)  # held-out metrics at t = fraction * T
DDPM_EVAL_T = (50, 250, 500, 750)


def held_out(args, device: torch.device) -> torch.Tensor:
    return trainset.held_out_crops(args.num_eval, 64, seed=1234).to(device)


class VQStage(Stage):
    """VQModel trained with MSE + codebook/commitment losses on `--crop-vq` px crops (the model is
    fully convolutional: 32 px crops cost a quarter of 64 px images); codebook initialised from
    encoder outputs of the first batch, dead codes restarted every `restart_every` steps.

    `--vq-continue` starts from the VQ-VAE already in <out>/tiny_vq/vqvae instead of a random one
    (codebook kept, but the tokens move: a transformer trained on the old ones must be trained again);
    `--vq-decoder-only` continues it with the encoder, quant_conv and codebook frozen, so the tokens
    (and a transformer trained on them) stay exactly valid.
    `--vq-permute-channels` shows each training image with a random RGB channel order (colour
    coverage; see `trainset.TrainingImages`).
    """

    name = "vq"
    restart_every = 50

    def build(self) -> dict:
        from diffusers import VQModel

        self.decoder_only = self.args.vq_decoder_only
        self.from_trained = self.decoder_only or self.args.vq_continue
        folder = self.out / "tiny_vq" / "vqvae"
        if self.from_trained:
            if not (folder / "config.json").exists():
                raise FileNotFoundError(f"--vq-continue / --vq-decoder-only need a trained VQ-VAE at {folder}: "
                                        "run --stage vq first")
            self.model = VQModel.from_pretrained(folder, **T.LOAD_KWARGS).to(self.device)
            trained = list(self.model.parameters())
            if self.decoder_only:
                self.model.requires_grad_(False)
                trained = list(self.model.decoder.parameters()) + list(self.model.post_quant_conv.parameters())
                for p in trained:
                    p.requires_grad_(True)
        else:
            self.model = VQModel(**T.vq_config(self.args.tiny)).to(self.device)
            trained = list(self.model.parameters())
        if self.args.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt = self.optimizer(trained)
        self.images = self.data(self.args.crop_vq, self.args.vq_permute_channels)
        k = self.model.config.num_vq_embeddings
        self.restarter = T.DeadCodeRestarter(k, self.device)
        self.eval_x = held_out(self.args, self.device)
        self.eval_whole = trainset.held_out_whole_images(64).to(self.device)
        return dict(model=self.model, opt=self.opt, usage=TensorState(self.restarter.usage))

    def step(self, step: int, frac: float) -> dict[str, torch.Tensor]:
        x = self.fmt(self.images.sample(self.batch, self.generator))
        if step == 0 and not self.from_trained:
            with torch.no_grad(), self.autocast():
                T.init_codebook(self.model, T.vq_encode_latents(self.model, x), self.generator)
        with self.autocast():
            out = T.vq_losses(self.model, x)
        loss = out["mse"] if self.decoder_only else out["loss"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.restarter.update(out["ids"])
        losses = dict(loss=loss, mse=out["mse"], vq=out["vq"])
        if step % self.restart_every == self.restart_every - 1 and frac < 0.9 and not self.decoder_only:
            losses["restarted"] = self.restarter.restart(self.model, out["z"].detach(), self.generator).float().sum()
        return losses

    @torch.no_grad()
    def evaluate(self, model=None) -> dict:
        model = self.model if model is None else model
        model.eval()
        recs, ids = [], []
        for x in self.eval_x.split(128):
            r, i = T.vq_reconstruct(model, x)
            recs.append(r)
            ids.append(i)
        rec = torch.cat(recs)
        whole, _ = T.vq_reconstruct(model, self.eval_whole)
        model.train()
        used = torch.unique(torch.cat(ids)).numel()
        return dict(psnr_crops=round(psnr(rec, self.eval_x).mean().item(), 3),
                    psnr_whole=round(psnr(whole, self.eval_whole).mean().item(), 3),
                    codes_used_eval=used, codes_alive=self.restarter.alive())

    def export(self) -> dict:
        from diffusers import VQModel

        folder = self.out / "tiny_vq" / "vqvae"
        params = T.save_fp16(self.model, folder)
        loaded = VQModel.from_pretrained(folder, **T.LOAD_KWARGS).to(self.device)  # the fp16 artifact, in fp32
        metrics = dict(self.evaluate(loaded), params=params, held_out_crops=len(self.eval_x),
                       bicubic_sr4_psnr_crops=round(T.bicubic_sr_psnr(self.eval_x).mean().item(), 3),
                       bicubic_sr4_psnr_whole=round(T.bicubic_sr_psnr(self.eval_whole).mean().item(), 3))
        self.report_folder = folder
        return metrics


class TransformerStage(Stage):
    """Discrete Transformer2DModel trained on the frozen VQ-VAE's tokens with the x0 cross-entropy
    of VQ-Diffusion's auxiliary loss alone (a documented simplification of the full VLB): z_t is
    drawn from q(z_t | z_0) of the VQDiffusionScheduler, one timestep per sample."""

    name = "transformer"

    def build(self) -> dict:
        from diffusers import Transformer2DModel, VQDiffusionScheduler, VQModel

        vq_dir = self.out / "tiny_vq" / "vqvae"
        if not (vq_dir / "config.json").exists():
            raise FileNotFoundError(f"the transformer stage needs a trained VQ-VAE at {vq_dir}: run --stage vq first")
        self.vq = freeze(VQModel.from_pretrained(vq_dir, **T.LOAD_KWARGS).to(self.device))
        self.k = self.vq.config.num_vq_embeddings
        # T = 100 as VQ-Diffusion; 10 in --tiny smoke runs (sampling loops over every t)
        self.num_t = 10 if self.args.tiny else 100
        self.scheduler = VQDiffusionScheduler(num_vec_classes=self.k + 1, num_train_timesteps=self.num_t)
        self.marginals = T.vq_diffusion_marginals(self.scheduler).to(self.device)
        side = T.vq_token_side(dict(self.vq.config))
        folder = self.out / "tiny_vq" / "transformer"
        if self.args.transformer_continue:
            if not (folder / "config.json").exists():
                raise FileNotFoundError(f"--transformer-continue needs a trained transformer at {folder}: "
                                        "run --stage transformer first")
            model = Transformer2DModel.from_pretrained(folder, **T.LOAD_KWARGS)
        else:
            model = Transformer2DModel(**T.transformer_config(self.k, side, self.args.tiny))
        self.model = T.enable_per_sample_timesteps(model.to(self.device))
        self.opt = self.optimizer(self.model.parameters())
        self.images = self.data()
        self.token_counts = torch.ones(self.k, device=self.device)  # add-one smoothed unigram counts
        with torch.no_grad():
            self.eval_tokens = torch.cat([T.vq_reconstruct(self.vq, x)[1] for x in held_out(self.args, self.device)
                                          .split(128)])
        return dict(model=self.model, opt=self.opt, token_counts=TensorState(self.token_counts))

    def step(self, step: int, frac: float) -> dict[str, torch.Tensor]:
        x = self.fmt(self.images.sample(self.batch, self.generator))
        with torch.no_grad(), self.autocast():
            z0 = T.vq_quantize(self.vq, T.vq_encode_latents(self.vq, x))[2]  # (B, N)
        self.token_counts += T.count_ids(z0, self.k)
        t = torch.randint(0, self.num_t, (z0.shape[0],), generator=self.generator, device=self.device)
        zt = T.q_sample_tokens(z0, t, self.marginals, self.k, self.generator)
        with self.autocast():
            logits = T.transformer_logits(self.model, zt, t)  # (B, N, K)
        loss = F.cross_entropy(logits.float().reshape(-1, self.k), z0.reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return dict(loss=loss)

    @torch.no_grad()
    def evaluate(self, model=None) -> dict:
        model = self.model if model is None else model
        model.eval()
        g = torch.Generator(device=self.device).manual_seed(4321)
        out = {}
        z0 = self.eval_tokens
        for t in [int(f * self.num_t) for f in TRANSFORMER_EVAL_FRACTIONS]:
            tt = torch.full((z0.shape[0],), t, device=self.device, dtype=torch.long)
            zt = T.q_sample_tokens(z0, tt, self.marginals, self.k, g)
            logits = torch.cat([T.transformer_logits(model, a, t).float() for a in zt.split(128)])
            out[f"ce_t{t}"] = round(F.cross_entropy(logits.reshape(-1, self.k), z0.reshape(-1)).item(), 4)
            out[f"acc_t{t}"] = round((logits.argmax(-1) == z0).float().mean().item(), 4)
        freq = self.token_counts / self.token_counts.sum()
        out["ce_unigram"] = round(-freq.log()[z0].mean().item(), 4)
        model.train()
        return out

    def export(self) -> dict:
        from diffusers import Transformer2DModel

        folder = self.out / "tiny_vq" / "transformer"
        params = T.save_fp16(self.model, folder)
        self.scheduler.save_pretrained(str(self.out / "tiny_vq" / "scheduler"))
        loaded = Transformer2DModel.from_pretrained(folder, **T.LOAD_KWARGS).to(self.device)
        loaded = T.enable_per_sample_timesteps(loaded)
        self.report_folder = folder
        return dict(self.evaluate(loaded), params=params, held_out_crops=len(self.eval_tokens),
                    objective="x0 cross-entropy (VQ-Diffusion auxiliary loss alone)")


class DDPMStage(Stage):
    """UNet2DModel eps-prediction DDPM (linear betas 1e-4..0.02, T = 1000) with an EMA that is saved."""

    name = "ddpm"

    def build(self) -> dict:
        from diffusers import DDPMScheduler, UNet2DModel

        self.scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                       beta_schedule="linear", prediction_type="epsilon")
        self.abar = self.scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.model = UNet2DModel(**T.unet_config(self.args.tiny)).to(self.device)
        if self.args.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = T.EMA(self.model, self.args.ema_decay)
        self.opt = self.optimizer(self.model.parameters())
        self.images = self.data()
        self.eval_x = held_out(self.args, self.device)
        return dict(model=self.model, ema=self.ema.shadow, opt=self.opt)

    def noisy(self, x0: torch.Tensor, t: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        eps = torch.randn(x0.shape, generator=g, device=self.device)
        a = self.abar[t][:, None, None, None]
        return self.fmt(a.sqrt() * x0 + (1 - a).sqrt() * eps), eps

    def step(self, step: int, frac: float) -> dict[str, torch.Tensor]:
        x0 = self.images.sample(self.batch, self.generator)
        t = torch.randint(0, 1000, (self.batch,), generator=self.generator, device=self.device)
        xt, eps = self.noisy(x0, t, self.generator)
        with self.autocast():
            pred = self.model(xt, t).sample
        loss = F.mse_loss(pred.float(), eps)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.ema.update(self.model, step)
        return dict(loss=loss)

    @torch.no_grad()
    def evaluate(self, model=None) -> dict:
        model = self.ema.shadow if model is None else model
        g = torch.Generator(device=self.device).manual_seed(4321)
        out = {}
        for t in DDPM_EVAL_T:
            tt = torch.full((len(self.eval_x),), t, device=self.device, dtype=torch.long)
            xt, eps = self.noisy(self.eval_x, tt, g)
            pred = torch.cat([model(a, b).sample.float() for a, b in zip(xt.split(128), tt.split(128), strict=True)])
            out[f"eps_mse_t{t}"] = round(F.mse_loss(pred, eps).item(), 5)
        return out

    def export(self) -> dict:
        from diffusers import UNet2DModel

        folder = self.out / "tiny_ddpm" / "unet"
        params = T.save_fp16(self.ema.shadow, folder)
        self.scheduler.save_pretrained(str(self.out / "tiny_ddpm" / "scheduler"))
        loaded = UNet2DModel.from_pretrained(folder, **T.LOAD_KWARGS).to(self.device).eval()
        self.report_folder = folder
        return dict(self.evaluate(loaded), params=params, held_out_crops=len(self.eval_x), ema_decay=self.ema.decay)
