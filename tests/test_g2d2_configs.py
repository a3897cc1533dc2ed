"""G2D2 paper-reproduction configs: every conf/experiment/g2d2_*.yaml selects the paper's data (FFHQ 1k or
the ImageNet 1k subset at 256 px), LPIPS-VGG, batch 1 and the public code's KL form; the G2D2 method files
carry their per-method settings without changing the table experiments; the ImageNet prompts use the
public code's full class labels (shipped asset), with torchvision's short names still available."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CONF, compose_config
from hydra.utils import instantiate
from omegaconf import OmegaConf

from g2d2.data import IMAGENET_FULL_LABELS, DataError, ImageNetSubset, imagenet_class_names

G2D2_EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("g2d2_*.yaml"))
SOURCES = {
    "ffhq": ("g2d2.data.ImageFolder", "G2D2_FFHQ_DIR"),
    "imagenet": ("g2d2.data.ImageNetSubset", "G2D2_IMAGENET_DIR"),
}


def test_every_g2d2_experiment_is_checked():
    assert len(G2D2_EXPERIMENTS) >= 4 and all(("ffhq" in n) != ("imagenet" in n) for n in G2D2_EXPERIMENTS)


@pytest.mark.parametrize("name", G2D2_EXPERIMENTS)
def test_g2d2_experiments_select_the_paper_data(name):
    cfg = compose_config([f"+experiment={name}"])
    dataset = "ffhq" if "ffhq" in name else "imagenet"
    target, env = SOURCES[dataset]
    data = OmegaConf.to_container(cfg.data, resolve=False)  # the path needs the env variable to resolve
    assert data["_target_"] == target and env in data["path"]
    assert cfg.data.image_size == 256 and cfg.lpips_net == "vgg" and cfg.batch_size == 1
    assert cfg.solver._target_ == "g2d2.solvers.g2d2.G2D2" and cfg.solver.kl_form == "public"
    assert cfg.prior.path == "microsoft/vq-diffusion-ithq"
    if dataset == "imagenet":
        assert cfg.prior.prompt_from_data and cfg.data.class_names == "full"
    else:
        assert cfg.data.limit == 1000 and cfg.prior.prompt == "a high-quality headshot of a person"


@pytest.mark.parametrize("method, data, guidance", [("g2d2_ffhq", "ffhq", 1.0), ("g2d2_imagenet", "imagenet", 5.0)])
def test_g2d2_methods_alone(method, data, guidance):
    cfg = compose_config([f"+method={method}", "task=gauss_deblur", f"data={data}"])
    assert cfg.lpips_net == "vgg" and cfg.solver.kl_form == "public" and cfg.prior.guidance_scale == guidance
    assert (cfg.solver.lr0, cfg.solver.lr_decay_w) == (15.0, 1.0)  # the preset from conf/setting/
    assert cfg.data.image_size == 256


@pytest.mark.parametrize("table, lpips", [
    ("table_g2d2_ffhq", "vgg"), ("table_g2d2_imagenet", "vgg"), ("table_dps_ffhq", "vgg"),
    ("table_dps_imagenet", "vgg"), ("table_red_diff", "alex"),
])
def test_tables_keep_their_lpips_backbone_for_every_method(table, lpips):
    methods = compose_config([f"+experiment={table}"], return_hydra_config=True).hydra.sweeper.params.method
    for method in methods.split(","):
        cfg = compose_config([f"+experiment={table}", f"method={method}", "task=sr4"])
        assert cfg.lpips_net == lpips and cfg.batch_size == 1 and cfg.data.image_size == 256
        if method.startswith("g2d2"):
            assert cfg.solver.kl_form == "public"
    # the tiny table keeps the exact KL (conf/solver/g2d2.yaml default)
    assert compose_config(["+experiment=tiny_table"]).solver.kl_form == "exact"


def test_full_imagenet_labels_asset():
    lines = IMAGENET_FULL_LABELS.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == 1001  # one label per line, newline-terminated
    labels = lines[:-1]
    assert labels[0] == "tench, Tinca tinca" and labels[1] == "goldfish, Carassius auratus"
    assert labels[999] == "toilet tissue, toilet paper, bathroom tissue"
    assert labels[134] == labels[517] == "crane" and labels[639] == "maillot, tank suit"
    assert all(label == label.strip() and label for label in labels)
    assert imagenet_class_names("full") == labels
    short = imagenet_class_names("torchvision")
    assert short[0] == "tench" and short[999] == "toilet tissue" and imagenet_class_names(None) == short
    with pytest.raises(DataError, match="does not exist"):
        imagenet_class_names("no/such/names.txt")


def test_imagenet_data_prompts_with_full_labels_by_default(tmp_path, monkeypatch):
    from PIL import Image

    for name in ("a.png", "b.png"):
        Image.new("RGB", (12, 12), (10, 120, 200)).save(tmp_path / name)
    listing = Path(tmp_path / "list.txt")
    listing.write_text("a.png 1\nb.png 999\n")
    monkeypatch.setenv("G2D2_IMAGENET_DIR", str(tmp_path))
    monkeypatch.setenv("G2D2_IMAGENET_LIST", str(listing))
    data = instantiate(compose_config(["data=imagenet", "data.image_size=8"]).data)
    assert isinstance(data, ImageNetSubset)
    assert [data.prompt(0), data.prompt(1)] == [
        "a photo of goldfish, Carassius auratus", "a photo of toilet tissue, toilet paper, bathroom tissue"]
    short = instantiate(compose_config(["data=imagenet", "data.image_size=8", "data.class_names=torchvision"]).data)
    assert [short.prompt(0), short.prompt(1)] == ["a photo of goldfish", "a photo of toilet tissue"]
