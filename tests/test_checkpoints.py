"""Checkpoint loading: every format round-trips from a model saved here; bad files get one clear line."""

import argparse
import json
import os

import probe_specs
import pytest
import torch
from probe_specs import TinyNet, adam, one_thread, train  # noqa: F401  (one_thread: an autouse fixture)
from torch import nn

from geomprobe.errors import ConfigurationError
from geomprobe.load.checkpoints import (
    expand_checkpoint_paths,
    inspect_checkpoint,
    load_checkpoint,
    plan_checkpoints,
    step_from_name,
)


def trained(steps=3, seed=0):
    torch.manual_seed(seed)
    model = TinyNet()
    opt = adam(model)
    train(model, opt, steps)
    return model, opt


def fresh():
    torch.manual_seed(123)  # weights that differ from every saved model's
    return TinyNet()


def assert_same_weights(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def assert_same_optimizer_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer):
    for pa, pb in zip([p for g in a.param_groups for p in g["params"]], [p for g in b.param_groups for p in g["params"]]):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a.state[pa][key], b.state[pb][key])
    assert a.param_groups[0]["lr"] == b.param_groups[0]["lr"]


# ------------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod."])
@pytest.mark.parametrize("zipped", [True, False])
def test_state_dict_with_wrapper_prefixes(tmp_path, prefix, zipped):
    model, _ = trained()
    path = tmp_path / "weights.pth"
    sd = {prefix + k: v for k, v in model.state_dict().items()}
    torch.save(sd, path, _use_new_zipfile_serialization=zipped)
    target = fresh()
    loaded = load_checkpoint(path, target)
    assert_same_weights(model, target)
    assert loaded.info.format == "state-dict" and loaded.info.step is None and loaded.optimizer is None


def test_torch_compiled_model_state_dict(tmp_path):
    model, _ = trained()
    torch.save(nn.DataParallel(model).state_dict(), tmp_path / "ddp-like.pt")
    target = fresh()
    load_checkpoint(tmp_path / "ddp-like.pt", target)
    assert_same_weights(model, target)


@pytest.mark.parametrize(
    "model_key, opt_key, step_key",
    [("model", "optimizer", "step"), ("model_state_dict", "optimizer_state_dict", "global_step"),
     ("state_dict", "optimizer", "epoch")],
)
def test_training_dict_with_adam_state(tmp_path, model_key, opt_key, step_key):
    model, opt = trained(steps=4)
    path = tmp_path / "train.pt"
    torch.save({model_key: model.state_dict(), opt_key: opt.state_dict(), step_key: 4,
                "args": argparse.Namespace(lr=1e-2)}, path)  # argparse arguments load safely
    target = fresh()
    loaded = load_checkpoint(path, target, optimizer=adam(target))
    assert_same_weights(model, target)
    assert_same_optimizer_state(opt, loaded.optimizer)
    assert loaded.info.format == "training-dict"
    assert (loaded.info.step, loaded.info.step_source, loaded.info.has_optimizer) == (4, step_key, True)
    # The loaded state belongs to the target's own parameters: precond can read it.
    assert all(p in loaded.optimizer.state for p in target.parameters())


def lightning_layout(model, opt, step):
    """The layout Lightning's ModelCheckpoint writes, for a LightningModule holding the net as `self.model`."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state["loss_fn.weight"] = torch.ones(3)  # a buffer of another attribute of the module: outside the prefix
    return {
        "epoch": 1, "global_step": step, "pytorch-lightning_version": "2.6.0", "state_dict": state,
        "loops": {"fit_loop": {"state_dict": {}}}, "callbacks": {}, "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [], "hparams_name": "kwargs", "hyper_parameters": {"hidden": 6, "lr": 0.01},
    }


def test_lightning_checkpoint_layout(tmp_path):
    model, opt = trained(steps=5)
    path = tmp_path / "epoch=1-step=5.ckpt"
    torch.save(lightning_layout(model, opt, 5), path)
    target = fresh()
    loaded = load_checkpoint(path, target, optimizer=adam(target))
    assert_same_weights(model, target)
    assert_same_optimizer_state(opt, loaded.optimizer)
    assert (loaded.info.format, loaded.info.step, loaded.info.step_source) == ("lightning", 5, "global_step")
    assert loaded.match.strip == "model." and loaded.match.ignored == ["loss_fn.weight"]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_lightning_checkpoint_from_a_real_trainer(tmp_path):
    L = pytest.importorskip("lightning.pytorch")

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.save_hyperparameters()
            self.net = TinyNet()

        def training_step(self, batch, i):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return adam(self)

    X, y = probe_specs.data()
    module = Module()
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    target = fresh()
    loaded = load_checkpoint(tmp_path / "last.ckpt", target, optimizer=adam(target))
    assert_same_weights(module.net, target)
    assert (loaded.info.format, loaded.info.step) == ("lightning", 3)
    assert loaded.optimizer is not None


def test_safetensors_with_step_metadata(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    model, _ = trained()
    path = tmp_path / "model.safetensors"
    st.save_file(model.state_dict(), str(path), metadata={"step": "40"})
    target = fresh()
    loaded = load_checkpoint(path, target)
    assert_same_weights(model, target)
    assert (loaded.info.format, loaded.info.step, loaded.info.step_source) == ("safetensors", 40, "step")


def test_hugging_face_save_pretrained_folder_with_tied_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(probe_specs.tiny_bert_config())
    folder = tmp_path / "checkpoint-500"
    model.save_pretrained(folder)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 500}))
    torch.manual_seed(1)
    target = transformers.BertForMaskedLM(probe_specs.tiny_bert_config())
    loaded = load_checkpoint(folder, target)
    assert_same_weights(model, target)
    assert (loaded.info.format, loaded.info.step) == ("hf-folder", 500)
    assert "cls.predictions.decoder.weight" in loaded.match.tied  # saved once, shared with the embeddings
    os.remove(folder / "trainer_state.json")
    assert plan_checkpoints([folder])[0].step == 500  # the folder's name


def test_pickled_module_needs_trust_pickle(tmp_path):
    model, _ = trained()
    path = tmp_path / "whole-model.pt"
    torch.save(model, path)
    with pytest.raises(ConfigurationError, match=r"pickled Python objects \(probe_specs.TinyNet\).*--trust-pickle"):
        load_checkpoint(path, fresh())
    target = fresh()
    with pytest.warns(UserWarning, match="weights_only=False"):
        loaded = load_checkpoint(path, target, trust_pickle=True)
    assert_same_weights(model, target)
    assert loaded.info.format == "pickled-module"


# ------------------------------------------------------------------------------------------ bad input


def single_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_missing_empty_and_corrupt_files(tmp_path):
    model, _ = trained()
    torch.save(model.state_dict(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    (tmp_path / "garbage.pt").write_bytes(b"\x80" + bytes(range(200)))
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    cases = {"missing.pt": "does not exist", "truncated.pt": "is corrupt", "empty.pt": "the file is empty",
             "notes.pt": "neither a torch.save zip archive", "garbage.pt": "is corrupt",
             "bad.safetensors": "is corrupt"}
    for name, message in cases.items():
        with pytest.raises(ConfigurationError, match=message) as info:
            load_checkpoint(tmp_path / name, fresh())
        single_line(info)


def test_a_folder_that_is_not_a_save_pretrained_folder(tmp_path):
    with pytest.raises(ConfigurationError, match="is not a Hugging Face save_pretrained folder"):
        load_checkpoint(tmp_path, fresh())


def test_mismatched_keys_are_listed_and_truncated(tmp_path):
    model, _ = trained()
    sd = model.state_dict()
    sd.pop("fc2.bias")
    for i in range(8):
        sd[f"extra.{i}.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "odd.pt")
    with pytest.raises(ConfigurationError) as info:
        load_checkpoint(tmp_path / "odd.pt", fresh())
    msg = single_line(info)
    assert "1 missing key(s): fc2.bias" in msg
    assert "8 unexpected key(s): extra.0.weight" in msg and "... and 3 more" in msg


def test_shape_mismatch(tmp_path):
    model, _ = trained()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    with pytest.raises(ConfigurationError, match=r"fc1.weight \(6, 4\) vs \(7, 4\)") as info:
        load_checkpoint(tmp_path / "w.pt", TinyNet(hidden=7))
    single_line(info)


def test_a_dict_without_weights(tmp_path):
    torch.save({"epoch": 3, "notes": "hello"}, tmp_path / "meta.pt")
    with pytest.raises(ConfigurationError, match="found no model weights .* keys 'epoch', 'notes'"):
        load_checkpoint(tmp_path / "meta.pt", fresh())


def test_two_copies_of_the_architecture_are_ambiguous(tmp_path):
    model, _ = trained()
    sd = {f"{p}.{k}": v for p in ("student", "teacher") for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd}, tmp_path / "distill.pt")
    with pytest.raises(ConfigurationError, match="equally well under prefixes 'student.', 'teacher.'"):
        load_checkpoint(tmp_path / "distill.pt", fresh())


def test_optimizer_state_that_does_not_fit(tmp_path):
    model, opt = trained()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "adam.pt")
    target = fresh()
    with pytest.raises(ConfigurationError, match="has entries exp_avg, exp_avg_sq, step but the spec builds RMSprop"):
        load_checkpoint(tmp_path / "adam.pt", target, optimizer=torch.optim.RMSprop(target.parameters()))
    with pytest.raises(ConfigurationError, match="does not fit the optimizer the spec builds"):
        load_checkpoint(tmp_path / "adam.pt", target, optimizer=torch.optim.Adam(list(target.parameters())[:2]))


# ------------------------------------------------------------------------------------------ steps and order


@pytest.mark.parametrize(
    "name, step",
    [("ckpt-1200.pt", 1200), ("epoch=3-step=450.ckpt", 450), ("step_7-v2.pt", 7), ("model.pt", None),
     ("run3_final_90.pth", 90)],
)
def test_step_from_name(name, step):
    assert step_from_name(name) == step


def test_several_checkpoints_are_ordered_by_step_and_globs_expand(tmp_path):
    for step in (300, 20, 100):
        model, _ = trained(steps=1, seed=step)
        torch.save(model.state_dict(), tmp_path / f"ckpt-{step}.pt")
    infos = plan_checkpoints([str(tmp_path / "ckpt-*.pt")], model=fresh())
    assert [(i.step, i.step_source) for i in infos] == [(20, "file name"), (100, "file name"), (300, "file name")]
    assert [os.path.basename(i.path) for i in infos] == ["ckpt-20.pt", "ckpt-100.pt", "ckpt-300.pt"]


def test_recorded_steps_win_over_names_and_order_is_the_last_resort(tmp_path):
    model, _ = trained()
    torch.save({"model": model.state_dict(), "global_step": 7}, tmp_path / "ckpt-999.pt")
    torch.save(model.state_dict(), tmp_path / "b.pt")
    torch.save(model.state_dict(), tmp_path / "a.pt")
    assert inspect_checkpoint(tmp_path / "ckpt-999.pt").step == 7
    infos = plan_checkpoints([tmp_path / "b.pt", tmp_path / "a.pt", tmp_path / "ckpt-999.pt"])
    assert [(os.path.basename(i.path), i.step, i.step_source) for i in infos] == [
        ("b.pt", 0, "order"), ("a.pt", 1, "order"), ("ckpt-999.pt", 2, "order")]


def test_duplicate_steps_missing_paths_and_empty_globs(tmp_path):
    model, _ = trained()
    torch.save({"model": model.state_dict(), "step": 5}, tmp_path / "a.pt")
    torch.save({"model": model.state_dict(), "step": 5}, tmp_path / "b.pt")
    with pytest.raises(ConfigurationError, match="both have step 5"):
        plan_checkpoints([tmp_path / "a.pt", tmp_path / "b.pt"])
    assert len(expand_checkpoint_paths([tmp_path / "a.pt", str(tmp_path / "a.pt")])) == 1
    with pytest.raises(ConfigurationError, match="no checkpoint matches"):
        expand_checkpoint_paths([str(tmp_path / "nothing-*.pt")])
    with pytest.raises(ConfigurationError, match="no checkpoints given"):
        expand_checkpoint_paths([])
