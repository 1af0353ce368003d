"""VLMDataModule end to end: real tokenizer, worker processes, counters, resume, Trainer."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from tokenizers_fixtures import make_tokenizer
from vlm_lit.data.datamodule import VLMDataModule
from vlm_lit.data.shards import read_samples, write_shards
from vlm_lit.data.tokenize import IMAGE_TOKEN

SIZE = 16


def chat(i: int, n_images: int = 0, answer: str | None = None) -> dict:
    user = [{"type": "image"}] * n_images + [{"type": "text", "text": f"what is {i}"}]
    return {
        "key": f"k{i}",
        "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer or f"it is {i}"},
        ],
        "images": [Image.new("L" if j % 2 else "RGB", (10 + j, 6)) for j in range(n_images)],
    }


def shards(out: Path, start: int, sizes: list[int], prefix: str, images: bool = False) -> str:
    index = start
    for n, size in enumerate(sizes):
        samples = [chat(i, n_images=(i % 3 if images else 0)) for i in range(index, index + size)]
        write_shards(samples, out, prefix=f"{prefix}{n}", max_samples_per_shard=size)
        index += size
    return str(out)


def add_broken_sample(path: str) -> None:
    """Rewrite a shard with one extra sample whose JSON is garbage."""
    with tarfile.open(path) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    with tarfile.open(path, "w") as dst:
        for info, data in members + [(tarfile.TarInfo("zz_bad.json"), b"{not json")]:
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))


def connected(**kwargs) -> VLMDataModule:
    dm = VLMDataModule(**kwargs)
    dm.connect(
        make_tokenizer("chatml"), image_size=SIZE, image_mean=(0.5,) * 3, image_std=(0.5,) * 3
    )
    return dm


def test_sources_accept_string_dict_and_weighted_list(tmp_path: Path) -> None:
    a = shards(tmp_path / "a", 0, [4, 4], "a")
    b = shards(tmp_path / "b", 100, [4, 4], "b")
    dm = VLMDataModule(train=a)
    dm.setup("fit")
    assert [(s.name, len(s.urls), s.weight) for s in dm.train_sources] == [("train", 2, 1.0)]
    dm = VLMDataModule(train={"name": "cap", "shards": f"{a}/a{{0..1}}-000000.tar"})
    dm.setup("fit")
    assert dm.train_sources[0].name == "cap" and len(dm.train_sources[0].urls) == 2
    dm = VLMDataModule(
        train=[{"name": "x", "shards": a, "weight": 0.7}, {"name": "y", "shards": b, "weight": 0.3}]
    )
    dm.setup("fit")
    assert [(s.name, s.weight) for s in dm.train_sources] == [("x", 0.7), ("y", 0.3)]
    with pytest.raises(ValueError, match="unknown.*'weigth'"):
        VLMDataModule(train={"shards": a, "weigth": 1}).setup("fit")
    with pytest.raises(ValueError, match="unique"):
        VLMDataModule(train=[{"name": "x", "shards": a}, {"name": "x", "shards": b}]).setup("fit")


def test_connect_adds_image_token_and_dataloaders_need_it(tmp_path: Path) -> None:
    dm = VLMDataModule(train=shards(tmp_path, 0, [4], "t"))
    with pytest.raises(RuntimeError, match="connect"):
        dm.train_dataloader()
    tokenizer = make_tokenizer("chatml")
    assert IMAGE_TOKEN not in tokenizer.get_vocab()
    dm.connect(tokenizer, image_size=SIZE, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    assert IMAGE_TOKEN in tokenizer.get_vocab()


def test_too_few_shards_fail_at_setup_naming_counts(tmp_path: Path) -> None:
    dm = VLMDataModule(train=shards(tmp_path, 0, [4, 4, 4], "t"), num_workers=2, world_size=2)
    with pytest.raises(ValueError, match=r"3 shard\(s\) but 2 rank\(s\) x 2 worker\(s\) = 4"):
        dm.setup("fit")


def test_images_collate_to_contract(tmp_path: Path) -> None:
    dm = connected(train=shards(tmp_path, 0, [6, 6], "i", images=True), batch_size=4)
    image_id = dm.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for batch in dm.train_dataloader():
        n = batch["pixel_values"].shape[0]
        assert batch["pixel_values"].shape == (n, 3, SIZE, SIZE)
        per_row = (batch["input_ids"] == image_id).sum(1)
        assert torch.equal(torch.bincount(batch["image_sample_index"], minlength=4)[:4], per_row)
        pad = dm.tokenizer.pad_token_id
        lengths = batch["attention_mask"].sum(1)
        for row, length in enumerate(lengths.tolist()):
            assert (batch["input_ids"][row, length:] == pad).all()
            assert (batch["labels"][row, length:] == -100).all()


def test_workers_counters_and_accumulation_groups(tmp_path: Path) -> None:
    root = shards(tmp_path, 0, [6, 6, 6, 6], "w")
    add_broken_sample(f"{root}/w0-000000.tar")
    long = "word " * 200
    write_shards([chat(900, answer=long)], tmp_path / "long", prefix="l")
    write_shards([chat(901, answer=long)], tmp_path / "long", prefix="m")
    dm = connected(
        train=[
            {"name": "good", "shards": root, "weight": 0.8},
            {"name": "long", "shards": f"{tmp_path}/long", "weight": 0.2},
        ],
        batch_size=3,
        num_workers=2,
        max_length=48,
        accumulate_grad_batches=2,
        epoch_samples=24,
    )
    batches = list(dm.train_dataloader())
    assert len(batches) == 24 // 3
    steps = [int(b["step_supervised_tokens"]) for b in batches]
    own = [int(b["num_supervised_tokens"]) for b in batches]
    assert steps == [own[i] + own[i + 1] for i in range(0, 8, 2) for _ in range(2)]
    counters = dm.counters()
    assert counters["train/samples/good"] == sum(len(b["keys"]) for b in batches) == 24
    # the shuffle buffer reads each worker's whole first pass, so the broken sample is met
    assert counters["train/skipped/invalid_json"] == 1
    assert counters["train/dropped/too_long"] >= 1  # the long chats never fit
    assert "counters" not in batches[0]
    assert dm.source_counts() == {"good": 24}


def test_broken_sample_is_skipped_and_counted(tmp_path: Path) -> None:
    root = shards(tmp_path, 0, [5], "b")
    add_broken_sample(f"{root}/b0-000000.tar")
    dm = connected(train=root, batch_size=5, shuffle_buffer=2)
    keys = [k for b in dm.train_dataloader() for k in b["keys"]]
    assert sorted(keys) == [f"k{i}" for i in range(5)]
    assert dm.counters()["train/skipped/invalid_json"] == 1


def test_epochs_reshuffle_and_state_dict_resumes_mid_epoch(tmp_path: Path) -> None:
    root = shards(tmp_path, 0, [5, 5, 5, 5], "r")
    dm = connected(train=root, batch_size=2, shuffle_buffer=3)
    epoch0 = [b["keys"] for b in dm.train_dataloader()]
    epoch1 = [b["keys"] for b in dm.train_dataloader()]
    assert len(epoch0) == len(epoch1) == 10 and epoch0 != epoch1

    fresh = connected(train=root, batch_size=2, shuffle_buffer=3)
    partial = []
    for batch in fresh.train_dataloader():
        partial.append(batch["keys"])
        if len(partial) == 4:
            break
    state = fresh.state_dict()
    assert (state["epoch"], state["batches_consumed"], state["samples_consumed"]) == (0, 4, 8)
    assert partial == epoch0[:4]

    resumed = connected(train=root, batch_size=2, shuffle_buffer=3)
    resumed.load_state_dict(state)
    assert [b["keys"] for b in resumed.train_dataloader()] == epoch0[4:]
    assert [b["keys"] for b in resumed.train_dataloader()] == epoch1  # next epoch intact


class _Recorder(L.LightningModule):
    """Smallest LightningModule: a scalar weight, records the batches it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.train_keys: list[str] = []
        self.val_keys: list[str] = []
        self.steps: list[tuple[int, int]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.train_keys += batch["keys"]
        self.steps.append(
            (int(batch["num_supervised_tokens"]), int(batch["step_supervised_tokens"]))
        )
        return self.w * batch["input_ids"].float().mean()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if not batch.get("is_padding", False):
            self.val_keys += batch["keys"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_fit_with_accumulation_and_exact_validation(tmp_path: Path) -> None:
    dm = connected(
        train=shards(tmp_path / "tr", 0, [5, 7], "t"),
        val=shards(tmp_path / "va", 500, [3, 4, 2], "v"),
        batch_size=2,
        val_generation_subset=2,
    )
    model = _Recorder()
    trainer = L.Trainer(
        max_epochs=1,
        accumulate_grad_batches=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert len(model.train_keys) == 12  # 6 batches of 2: 12 samples counted in the shards
    for i in range(0, 6, 2):
        first, second = model.steps[i], model.steps[i + 1]
        assert first[1] == second[1] == first[0] + second[0]
    assert sorted(model.val_keys) == [f"k{i}" for i in range(500, 509)]
    state = dm.state_dict()
    assert state["batches_consumed"] == 6 and state["samples_consumed"] == 12
    assert dm.counters()["train/samples/train"] == 12


class _StopAt(L.Callback):
    """Simulates a crash right after the checkpoint of ``step`` was written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def test_resume_from_mid_epoch_checkpoint_sees_only_unseen_samples(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    root = shards(tmp_path / "tr", 0, [5, 7], "t")

    def fit(model: _Recorder, callbacks: list | None = None, ckpt: Path | None = None) -> None:
        dm = connected(train=root, batch_size=2)
        trainer = L.Trainer(
            max_epochs=1,
            callbacks=callbacks,
            enable_checkpointing=bool(callbacks),
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        try:
            trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
        except SystemExit:  # Lightning's graceful shutdown after the simulated crash
            pass

    full, first, rest = _Recorder(), _Recorder(), _Recorder()
    fit(full)
    saver = ModelCheckpoint(dirpath=tmp_path, filename="mid", every_n_train_steps=3, save_top_k=-1)
    fit(first, callbacks=[saver, _StopAt(3)])
    fit(rest, ckpt=tmp_path / "mid.ckpt")
    assert len(first.train_keys) == 6
    assert first.train_keys + rest.train_keys == full.train_keys  # no repeat, nothing lost


def test_batch_pixels_are_exactly_the_per_image_transform(tmp_path: Path) -> None:
    """The DataModule normalises uint8 pixels per batch: the floats must be exactly those of
    transforming each image alone, in padded, packed and validation batches."""
    gen = torch.Generator().manual_seed(0)
    samples = []
    for i in range(12):
        sample = chat(i, n_images=1 + i % 2)
        noise = torch.randint(0, 256, (len(sample["images"]), 6 + i, 9, 3), generator=gen)
        sample["images"] = [Image.fromarray(a.byte().numpy(), "RGB") for a in noise]
        samples.append(sample)
    write_shards(samples, tmp_path / "t", max_samples_per_shard=6)
    write_shards(samples, tmp_path / "v", max_samples_per_shard=6)
    decoded = {s["key"]: s["images"] for s in read_samples(str(tmp_path / "t"))}
    for packing in (False, True):
        dm = connected(
            train=str(tmp_path / "t"),
            val=str(tmp_path / "v"),
            batch_size=4,
            packing=packing,
            max_length=128,
        )
        dm.setup("fit")
        expected = {k: torch.stack([dm.transform(im) for im in ims]) for k, ims in decoded.items()}
        for loader, full in ((dm.train_dataloader(), False), (dm.val_dataloader(), True)):
            checked = set()
            for batch in loader:
                pixels = batch["pixel_values"]
                assert pixels.dtype == torch.float32
                rows = batch.get("sample_row", torch.arange(len(batch["keys"])))
                owners = batch["image_sample_index"].tolist()
                offset = 0
                for sample, key in enumerate(batch["keys"]):
                    n = len(expected[key])
                    assert owners[offset : offset + n] == [int(rows[sample])] * n
                    assert torch.equal(pixels[offset : offset + n], expected[key])
                    offset += n
                    checked.add(key)
            # validation reads every sample once; training batches need not cover them all
            assert checked == set(expected) if full else len(checked) >= 8
