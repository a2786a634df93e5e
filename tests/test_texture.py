"""The texture stage: the decoder's body/head split is exact, only the head learns, the latent
stays, a killed stage resumes to the same weights, and bad settings are one clear error."""

from __future__ import annotations

import pytest
import torch
from conftest import copy_run, run_cli

from spatialvae.cli import main
from spatialvae.config import Config, get_preset
from spatialvae.data import as_float_images
from spatialvae.errors import ConfigError
from spatialvae.losses import build_loss
from spatialvae.model import build_model, check_buildable
from spatialvae.runs import load_model
from spatialvae.texture import PatchDiscriminator, TextureStage, head_inputs, hinge_d_loss
from spatialvae.texture_run import decoder_checkpoint, fit_run_texture, sharp_path, texture_state_path

torch.set_num_threads(2)


def _trained_like(cfg: Config):
    """A smoke model whose zero-initialised branches are not zero (as after training)."""
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("size,channels", [(32, (8, 16, 32)), (64, (8, 16, 32, 32))])
def test_body_then_head_is_the_decoder_exactly(size, channels):
    cfg = get_preset("smoke").with_overrides({"data.image_size": size, "model.channels": channels})
    model = _trained_like(cfg)
    z = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(1))
    full = model.decoder(z)
    for k in range(0, len(model.decoder.blocks) + 1):
        assert torch.equal(model.decoder.head(*model.decoder.body(z, k), k), full), k


def test_patch_discriminator_shapes_and_hinge_loss():
    d = PatchDiscriminator(channels=8, layers=3)
    logits, feats = d(torch.rand(2, 1, 128, 128))
    assert logits.shape == (2, 1, 15, 15)
    assert [f.shape[1:] for f in feats] == [(8, 64, 64), (16, 32, 32), (32, 16, 16)]
    ones = torch.ones(4)
    assert hinge_d_loss(ones, -ones).item() == 0.0  # both sides past the margin
    assert hinge_d_loss(0 * ones, 0 * ones).item() == 2.0


def _head_prefixes(model) -> tuple:
    """State-dict prefixes of head_blocks=1's head: the last upsampling block and the output convs."""
    return f"decoder.blocks.{len(model.decoder.blocks) - 1}.", "decoder.up_out.", "decoder.conv_out."


def test_the_stage_trains_the_head_only_and_keeps_the_latent():
    cfg = get_preset("smoke").with_overrides({"texture.steps": 3, "texture.batch_size": 4})
    model = _trained_like(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = (torch.rand(6, 32, 32, generator=torch.Generator().manual_seed(2)) * 255).byte()
    inputs = head_inputs(model, images, 1, hflip=True)
    assert len(inputs["images"]) == 12 and torch.equal(inputs["images"][6:], images.flip(-1))
    stage = TextureStage(model, build_loss(cfg), cfg)
    stage.fit(inputs)
    head = _head_prefixes(model)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(head) for k in changed)
    assert any(k.startswith("decoder.conv_out.") for k in changed)
    assert stage.step == 3 and not any(p.requires_grad for p in model.encoder.parameters())


@pytest.mark.parametrize("ema", [0.0, 0.5])
def test_the_exported_head_is_the_ema_of_the_trained_one(ema):
    cfg = get_preset("smoke").with_overrides({"texture.steps": 3, "texture.batch_size": 4, "texture.ema": ema,
                                              "texture.disc_warmup_steps": 1})
    model = _trained_like(cfg)
    images = (torch.rand(6, 32, 32, generator=torch.Generator().manual_seed(2)) * 255).byte()
    inputs = head_inputs(model, images, 1, hflip=False)
    stage = TextureStage(model, build_loss(cfg), cfg)
    expected = [p.detach().clone() for p in stage.head.parameters()]
    for _ in range(3):  # step 0 trains the critic alone: the head and its average stay put
        stage.train_step(inputs)
        expected = [ema * e + (1 - ema) * p.detach() for e, p in zip(expected, stage.head.parameters())]
    live = [p.detach().clone() for p in stage.head.parameters()]
    for e, a in zip(expected, stage.ema_head.parameters()):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-6)
    assert any(not torch.equal(e, p) for e, p in zip(stage.ema_head.parameters(), live)) == (ema > 0)
    stage.use_ema()
    assert all(torch.equal(p, e) for p, e in zip(stage.head.parameters(), stage.ema_head.parameters()))


def test_cached_smooth_output_is_the_models_reconstruction_and_the_anchor_starts_at_zero():
    cfg = get_preset("smoke").with_overrides({"texture.steps": 2, "texture.batch_size": 4,
                                              "texture.anchor_weight": 1.0, "texture.adv_weight": 0.0})
    model = _trained_like(cfg)
    images = (torch.rand(5, 32, 32, generator=torch.Generator().manual_seed(3)) * 255).byte()
    inputs = head_inputs(model, images, 1, hflip=False)
    with torch.no_grad():
        recon = model.decode(model.encode(as_float_images(images))[0])  # posterior mean, whole decoder
    assert inputs["smooth"].shape == (5, 1, 32, 32) and inputs["smooth"].dtype == torch.float16
    torch.testing.assert_close(inputs["smooth"].float(), recon, atol=1e-3, rtol=0)  # float16 rounding only
    stage = TextureStage(model, build_loss(cfg), cfg)
    first = stage.train_step(inputs)
    assert first["anchor"] < 1e-3  # the untrained head draws the smooth image: nothing to pull back yet
    assert stage.train_step(inputs)["anchor"] > first["anchor"]  # a step moved the head off it


def test_a_stage_killed_after_a_save_resumes_to_the_same_weights(fake_smoke_run, tmp_path, monkeypatch):
    run, tree = fake_smoke_run
    cfg = Config.from_json(run / "config.json").with_overrides(
        {"texture.enabled": True, "texture.steps": 8, "texture.log_every": 3, "data.root": str(tree["root"])})
    whole = copy_run(run, tmp_path / "whole")
    fit_run_texture(whole, cfg, progress=False, log=lambda s: None)
    killed = copy_run(run, tmp_path / "killed")
    real_step = TextureStage.train_step

    def dies_at_step_5(self, inputs):
        if self.step == 5:  # after the step-3 save, before the step-6 one
            raise KeyboardInterrupt
        return real_step(self, inputs)

    monkeypatch.setattr(TextureStage, "train_step", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        fit_run_texture(killed, cfg, progress=False, log=lambda s: None)
    assert not sharp_path(killed).exists()
    monkeypatch.setattr(TextureStage, "train_step", real_step)
    lines = []
    fit_run_texture(killed, cfg, progress=False, log=lines.append)
    assert any("resuming" in s and "step 3 of 8" in s for s in lines)
    a, b = (torch.load(sharp_path(r), weights_only=True) for r in (whole, killed))
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    sa, sb = (torch.load(texture_state_path(r), weights_only=True) for r in (whole, killed))
    assert all(torch.equal(sa["disc"][k], sb["disc"][k]) for k in sa["disc"]) and sb["done"] and sb["step"] == 8
    assert "disc" not in a and a["texture"]["steps"] == 8  # the discriminator stays out of the exported model
    # the encoder is the smooth model's: the latent and the learned prior stay valid
    smooth, _, _ = load_model(run / "checkpoints" / "best.pt")
    assert all(torch.equal(v, smooth.state_dict()[k]) for k, v in a["model"].items() if k.startswith("encoder."))
    kept = []
    fit_run_texture(killed, cfg, progress=False, log=kept.append)  # a finished stage is kept
    assert any("already trained" in s for s in kept)


def test_commands_pick_the_sharp_decoder_when_there_is_one(fake_smoke_run, tmp_path, capsys):
    run = copy_run(fake_smoke_run[0], tmp_path)
    best = run / "checkpoints" / "best.pt"
    assert decoder_checkpoint(run) == best
    with pytest.raises(Exception, match="has no sharp decoder"):
        decoder_checkpoint(run, "sharp")
    cfg = Config.from_json(run / "config.json").with_overrides(
        {"texture.steps": 2, "texture.log_every": 2, "data.root": str(fake_smoke_run[1]["root"])})
    fit_run_texture(run, cfg, progress=False, log=lambda s: None)
    assert decoder_checkpoint(run) == sharp_path(run) and decoder_checkpoint(run, "smooth") == best
    assert main(["sample", "--run", str(run), "--n", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert "sharp.pt" in capsys.readouterr().out
    assert main(["sample", "--run", str(run), "--n", "4", "--decoder", "smooth", "--out", str(tmp_path / "t.png")]) == 0
    assert "best.pt" in capsys.readouterr().out


def test_a_finished_run_gains_the_stage_on_resume_and_another_stage_seed_redraws_the_head_only(
        fake_smoke_run, tmp_path, capsys):
    """The stage is a short GAN whose outcome varies with its seed (README): `train --resume RUN
    --set texture.enabled=true` adds it to a finished run, and another ``texture.seed`` trains it
    again, changing the head's weights and nothing else; best.pt and prior.pt stay byte for byte."""
    run, tree = fake_smoke_run
    run = copy_run(run, tmp_path / "run")
    kept = {n: (run / "checkpoints" / n).read_bytes() for n in ("best.pt", "prior.pt")}
    args = ["train", "--resume", run, "--data", tree["root"], "--quiet", "--set", "texture.enabled=true"]
    assert run_cli(capsys, *args)[0] == 0
    first = torch.load(sharp_path(run), weights_only=True)["model"]
    assert run_cli(capsys, *args, "--set", "texture.seed=1")[0] == 0
    second = torch.load(sharp_path(run), weights_only=True)["model"]
    log = (run / "train.log").read_text()
    assert "other settings; training it again" in log and "after all 3 epochs" in log  # smoke: 1 + 2 epochs
    assert {n: (run / "checkpoints" / n).read_bytes() for n in kept} == kept
    head = _head_prefixes(load_model(run / "checkpoints" / "best.pt")[0])
    changed = {k for k in first if not torch.equal(first[k], second[k])}
    assert changed and all(k.startswith(head) for k in changed)


@pytest.mark.parametrize("overrides,expected", [
    ({"texture.steps": 0}, "texture.steps=0"),
    ({"texture.head_blocks": 0}, "texture.head_blocks=0"),
    ({"texture.lr": 0}, "texture.lr=0"),
    ({"texture.disc_lr": -1}, "texture.disc_lr=-1"),
    ({"texture.adv_weight": -0.1}, "texture.adv_weight=-0.1"),
    ({"texture.anchor_weight": -1.0}, "texture.anchor_weight=-1.0"),
    ({"texture.anchor_cutoff": 0.0}, "texture.anchor_cutoff=0.0"),
    ({"texture.anchor_cutoff": 1.5}, "texture.anchor_cutoff=1.5"),
    ({"texture.disc_layers": 0}, "texture.disc_layers=0"),
    ({"texture.ema": 1.0}, "texture.ema=1.0"),
    ({"texture.ema": -0.1}, "texture.ema=-0.1"),
    ({"texture.critic_input": "residual"}, "texture.critic_input='residual'"),
])
def test_an_impossible_stage_is_refused_by_the_config(overrides, expected):
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        get_preset("smoke").with_overrides(overrides)


def test_the_stage_is_refused_for_the_flat_baseline_and_for_too_many_blocks():
    with pytest.raises(ConfigError, match="texture.enabled=True is invalid"):
        get_preset("original").with_overrides({"texture.enabled": True})
    cfg = get_preset("smoke").with_overrides({"texture.enabled": True, "texture.head_blocks": 9})
    with pytest.raises(ConfigError, match="texture.head_blocks=9 is invalid: expected 1 to 3"):
        check_buildable(cfg)


def test_train_with_a_bad_stage_setting_is_one_line_and_writes_nothing(tmp_path, capsys):
    code = main(["train", "--preset", "smoke", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "runs"),
                 "--set", "texture.enabled=true", "--set", "texture.head_blocks=7"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("error: ") == 1 and "texture.head_blocks=7" in err
    assert not (tmp_path / "runs").exists()


def test_the_anchor_low_pass_keeps_a_cosine_below_the_cutoff_and_removes_one_above():
    cfg = get_preset("smoke").with_overrides({"texture.anchor_weight": 1.0, "texture.anchor_cutoff": 0.5})
    stage = TextureStage(_trained_like(cfg), build_loss(cfg), cfg)
    n = torch.arange(32.0)
    low = torch.cos(2 * torch.pi * 4 / 32 * n)[None, None, None, :].expand(1, 1, 32, 32)  # 0.25 of Nyquist
    high = torch.cos(2 * torch.pi * 12 / 32 * n)[:, None].expand(32, 32)[None, None]  # 0.75 of Nyquist
    torch.testing.assert_close(stage._low_pass(low + high), low, atol=1e-5, rtol=0)


def test_the_high_pass_critic_sees_nothing_below_the_cutoff():
    cfg = get_preset("smoke").with_overrides({"texture.critic_input": "high_pass", "texture.anchor_cutoff": 0.5})
    stage = TextureStage(_trained_like(cfg), build_loss(cfg), cfg)
    n = torch.arange(32.0)
    low = 0.5 + 0.3 * torch.cos(2 * torch.pi * 4 / 32 * n)[None, None, None, :].expand(1, 1, 32, 32)
    high = 0.01 * torch.cos(2 * torch.pi * 12 / 32 * n)[:, None].expand(32, 32)[None, None]
    torch.testing.assert_close(stage.critic_view(low), torch.full_like(low, 0.5), atol=1e-5, rtol=0)
    torch.testing.assert_close(stage.critic_view(low + high), 0.5 + 4 * high, atol=1e-5, rtol=0)
    whole = TextureStage(_trained_like(cfg), build_loss(cfg), cfg.with_overrides({"texture.critic_input": "image"}))
    assert torch.equal(whole.critic_view(low + high), low + high)
