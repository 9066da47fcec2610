"""commute.checkpoint on its own: save/load round trip, RNG restore, pruning, leftovers, re-exports."""

from __future__ import annotations

import pytest
import torch

import commute.checkpoint as C
import commute.train as T
from commute.errors import CommuteError
from commute.model import build_model
from commute.train_config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

OVERRIDES = {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 16}


def saved_run(tmp_path, steps=(1,)):
    cfg = TrainConfig(model="tiny", model_overrides=OVERRIDES, vocab_size=32, optimizer="adam")
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=32, **OVERRIDES)
    opt = T._build_optimizer(model, cfg)
    loss = model(input_ids=torch.randint(0, 32, (2, 8)), labels=None).logits.square().mean()
    loss.backward()
    opt.step()
    paths = []
    for s in steps:
        state = {"format": C.CKPT_FORMAT, "step": s, "config": cfg.to_dict(), "arch": C.model_arch(model)}
        paths.append(C.save_checkpoint(tmp_path, s, model, opt, state))
    return model, opt, paths


def test_round_trip_restores_weights_optimiser_and_rng(tmp_path) -> None:
    torch.manual_seed(123)
    model, opt, (path,) = saved_run(tmp_path)
    after_save = torch.rand(5)  # the draw that follows the saved RNG state
    ck = C.load_checkpoint(tmp_path, with_optimizer=True)
    assert ck.path == path == C.find_checkpoint(tmp_path) and ck.step == 1
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000001\n"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ck.model.state_dict().values(),
                                                  strict=True))
    assert ck.optimizer_state["param_groups"] == opt.state_dict()["param_groups"]
    assert set(ck.state["files"]) == set(C.CKPT_FILES)
    C.restore_rng_state(path)
    assert torch.equal(torch.rand(5), after_save)
    with pytest.raises(CommuteError, match="different model"):
        C.check_arch(path, ck.state["arch"], build_model("tiny", vocab_size=32, **{**OVERRIDES, "n_embd": 8}))


def test_prune_keeps_the_newest_and_the_named_steps_and_leftovers_are_removed(tmp_path) -> None:
    _, _, paths = saved_run(tmp_path, steps=(2, 3, 4, 6))
    C.prune_checkpoints(tmp_path, 0, [], current=paths[-1])  # 0 keeps all
    assert [p.name for p in C.list_checkpoints(tmp_path)] == [p.name for p in paths]
    C.prune_checkpoints(tmp_path, 1, [3], current=paths[-1])
    assert [p.name for p in C.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000006"]
    junk = tmp_path / "checkpoints" / ".tmp-step_00000008-x"
    junk.mkdir()
    C.remove_partial_checkpoints(tmp_path)
    assert not junk.exists() and len(C.list_checkpoints(tmp_path)) == 2


def test_names_are_importable_from_commute_train_as_before() -> None:
    for name in ("load_checkpoint", "find_checkpoint", "list_checkpoints", "Checkpoint", "CKPT_FORMAT"):
        assert getattr(T, name) is getattr(C, name), name
    assert T.TrainConfig is TrainConfig
    for name in T.__all__:
        assert hasattr(T, name), name


def test_a_state_dict_is_written_as_the_module(tmp_path) -> None:
    """model.state_dict() gives each tied name its own tensor object over one storage: save_model_state finds
    the tie by memory, as safetensors' save_model does, and writes the module's bytes."""
    from safetensors.torch import save_model

    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=32, **OVERRIDES)
    sd = model.state_dict()
    assert sd["lm_head.weight"] is not sd["transformer.wte.weight"]  # what made the id() grouping fail
    save_model(model, str(tmp_path / "module.safetensors"))
    C.save_model_state(sd, tmp_path / "state.safetensors")
    assert (tmp_path / "state.safetensors").read_bytes() == (tmp_path / "module.safetensors").read_bytes()
    # equal values in separate memory are not tied: both names are stored
    cloned = {k: v.clone() for k, v in sd.items()}
    C.save_model_state(cloned, tmp_path / "cloned.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "cloned.safetensors"), "pt") as f:
        assert set(f.keys()) == set(sd) and not f.metadata()


def test_the_sharded_restore_refuses_with_the_messages_of_the_module_restore(tmp_path) -> None:
    """train._load_sharded_weights (FSDP: every rank reads the full file) reuses read_weights and
    check_finite: a non-finite checkpoint, a damaged file and another model give load_weights/check_finite's
    sentences (the count of further non-finite tensors included). A plain model takes the same path."""
    model, _, (path,) = saved_run(tmp_path)

    def refusal(load) -> str:
        fresh = build_model("tiny", vocab_size=32, **OVERRIDES)
        with pytest.raises(CommuteError) as info:
            load(fresh)
        return str(info.value)

    def module(m) -> None:
        C.load_weights(path, m, "cpu")
        C.check_finite(path, m)

    def sharded(m) -> None:
        T._load_sharded_weights(path, m)

    T._load_sharded_weights(path, fresh := build_model("tiny", vocab_size=32, **OVERRIDES))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(),
                                                  strict=True))
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    with torch.no_grad():
        model.transformer.wte.weight[0, 0] = float("nan")  # tied: counted once
        model.transformer.h[0].ln_1.bias[1] = float("inf")
        model.transformer.ln_f.weight[2] = float("nan")
    from safetensors.torch import save_model

    save_model(model, str(path / "model.safetensors"))
    msg = refusal(sharded)
    assert msg == refusal(module) and " and 2 more); continue from an earlier checkpoint" in msg
    other = build_model("tiny", vocab_size=32, **{**OVERRIDES, "n_layer": 2})
    for load in (lambda m: C.load_weights(path, m, "cpu"), lambda m: T._load_sharded_weights(path, m)):
        with pytest.raises(CommuteError, match=r"does not fit this model \(missing 12, unexpected 0 tensors"):
            load(other)
    (path / "model.safetensors").write_bytes(b"\x00garbage")
    assert refusal(sharded) == refusal(module)
    assert refusal(module).startswith(f"cannot load the weights of checkpoint {str(path)!r} into this model")
