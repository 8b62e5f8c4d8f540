"""Compress, then repair (rewarm.repair): exact pruning patterns, Wanda's scores, the quantization
error bound, masks kept through training and resume, soft prompts that leave the weights alone,
IDP's deterministic choice, and the inputs that are refused."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_same_run, assert_user_error, interrupt_after, metrics, run_cli, small_run_config, write_config
from rewarm.repair.compress import Pattern, _input_norms, block_linears, prune_scores, quantize_rtn


def test_pruning_reaches_the_sparsity_exactly_and_n_m_has_n_zeros_per_group():
    scores = torch.rand(8, 16)
    per_row = prune_scores(scores, 0.5, Pattern(), per_row=True)
    assert (per_row.sum(1) == 8).all()  # each row: exactly half kept
    whole = prune_scores(scores, 0.25, Pattern(), per_row=False)
    assert int((~whole).sum()) == 32
    assert scores[~whole].max() <= scores[whole].min()  # the lowest scores went
    nm = prune_scores(scores, 0.0, Pattern.parse("2:4"), per_row=True)
    assert ((~nm).reshape(8, 4, 4).sum(-1) == 2).all()


def test_wanda_prunes_by_weight_times_input_size():
    """Equal |W| everywhere: magnitude cannot choose; Wanda drops the inputs that are small."""
    w = torch.ones(3, 4)
    norms = torch.tensor([10.0, 0.1, 5.0, 0.2])  # ‖X_j‖ of the four inputs
    keep = prune_scores(w.abs() * norms[None, :], 0.5, Pattern(), per_row=True)
    assert keep.tolist() == [[True, False, True, False]] * 3


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, shards):
    """A real 2-layer model trained 4 steps, then pruned 50% with Wanda (CLI) on code."""
    root = tmp_path_factory.mktemp("repair")
    cfg = small_run_config(root / "base", shards, **{"train.max_steps": 4, "eval.interval": 2, "checkpoint.interval": 0})
    assert run_cli("train", str(write_config(root / "base.yaml", cfg)), "-q").returncode == 0
    proc = run_cli("compress", str(root / "base" / "final"), "-o", str(root / "wanda"), "--method", "wanda",
                   "--calib", str(shards["downstream"]), "--calib-tokens", "2048", "--seq-len", "64", "-q")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root


def test_wanda_norms_are_the_input_activations(pruned):
    """On a real model: the norms Wanda uses for the first block are ‖X_j‖₂ of that block's inputs."""
    model = AutoModelForCausalLM.from_pretrained(pruned / "base" / "final").eval()
    name, lin = block_linears(model)[0][0]
    windows = torch.randint(0, 512, (3, 16))
    seen = []
    h = lin.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        model(input_ids=windows)
    h.remove()
    from rewarm.distributed import transformer_blocks

    norms = _input_norms(model, transformer_blocks(model)[0], block_linears(model)[0], windows, batch=2)
    assert torch.allclose(norms[name].double(), torch.cat(seen).pow(2).sum(0).sqrt(), rtol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quantization_error_is_within_half_a_step_and_uses_2_to_the_k_levels(bits):
    w = torch.randn(6, 64)
    deq, step = quantize_rtn(w, bits, 16)
    err = (deq - w).abs().reshape(6, 4, 16)
    assert (err <= step[..., None] / 2 + 1e-6).all()
    assert all(len(g.unique()) <= 2 ** bits for g in deq.reshape(-1, 16))
    ragged, steps = quantize_rtn(w[:, :40], bits, 16)  # 40 inputs: groups of 16, 16 and the last 8
    assert steps.shape == (6, 3) and ((ragged - w[:, :40]).abs()[:, 32:] <= steps[:, 2:] / 2 + 1e-6).all()


def test_compress_cli_records_what_it_did(pruned, shards):
    out = pruned / "wanda"
    model = AutoModelForCausalLM.from_pretrained(out)
    rec = model.config.rewarm_compression[-1]
    assert rec["method"] == "wanda" and rec["achieved_sparsity"] == pytest.approx(0.5)
    for ls in block_linears(model):
        for _, lin in ls:
            assert ((lin.weight == 0).sum(1) == lin.in_features // 2).all()  # per row, as Wanda compares
    assert json.loads((out / "compression.json").read_text())["record"]["calibration_tokens"] == 2048
    proc = run_cli("compress", str(out), "-o", str(pruned / "rtn3"), "--method", "rtn", "--bits", "3", "--group", "16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    twice = AutoModelForCausalLM.from_pretrained(pruned / "rtn3")
    assert [r["method"] for r in twice.config.rewarm_compression] == ["wanda", "rtn"]  # stacked, each recorded
    for ls in block_linears(twice):  # quantizing keeps the pruned zeros
        for _, lin in ls:
            assert ((lin.weight == 0).sum(1) >= lin.in_features // 2).all()


def test_bad_compress_inputs_exit_2(pruned, shards, tokenizer_dir, tmp_path):
    base = str(pruned / "base" / "final")
    out = str(tmp_path / "x")
    assert_user_error(run_cli("compress", base, "-o", out, "--method", "magnitude", "--sparsity", "1.0"), "[0, 1)")
    assert_user_error(run_cli("compress", base, "-o", out, "--method", "magnitude", "--sparsity", "-0.1"), "[0, 1)")
    assert_user_error(run_cli("compress", base, "-o", out, "--method", "rtn", "--bits", "1"), "between 2 and 16")
    assert_user_error(run_cli("compress", base, "-o", out, "--method", "rtn", "--group", "0"), "--group must be")
    assert_user_error(run_cli("compress", base, "-o", out, "--method", "wanda"), "--calib")
    assert_user_error(run_cli("compress", base, "-o", out, "--method", "magnitude", "--pattern", "4:2"), "0 < N < M")
    assert_user_error(run_cli("compress", base, "-o", out, "--method", "magnitude", "--pattern", "2:4", "--sparsity", "0.9"),
                      "fixes the sparsity")
    assert_user_error(run_cli("compress", base, "-o", out, "--method", "rtn", "--calib", str(shards["downstream"])),
                      "--calib is read by --method wanda only")
    assert_user_error(run_cli("compress", base, "-o", out, "--method", "wanda", "--calib", str(shards["downstream"]),
                              "--seq-len", "5000"), "positions")
    assert_user_error(run_cli("compress", base, "-o", str(pruned / "wanda"), "--method", "magnitude"), "already exists")
    # calibration data made with another tokenizer
    from rewarm.data.prepare import prepare
    from rewarm.tokenizer import train_tokenizer

    other_tok = train_tokenizer(["a b c d e f g " * 200, "x y z " * 300], 300, tmp_path / "tok2")
    for i in range(4):
        (tmp_path / f"t{i}.txt").write_text(f"some text number {i} for another tokenizer. " * 200)
    prepare([str(tmp_path / f"t{i}.txt") for i in range(4)], str(other_tok), tmp_path / "other", val_tokens=200,
            progress=False)
    assert_user_error(run_cli("compress", base, "-o", out, "--method", "wanda", "--calib", str(tmp_path / "other")),
                      "different tokenizer")
    assert not (tmp_path / "x").exists()


def test_masks_survive_training_and_resume(pruned, shards, tmp_path):
    from rewarm.config import config_from_dict
    from rewarm.train import train

    cfg = small_run_config(tmp_path / "keep", shards, init="weights", **{
        "model": {"path": str(pruned / "wanda")}, "train.keep_sparsity": True, "train.max_steps": 4,
        "eval.interval": 2, "checkpoint.interval": 2})
    run = train(config_from_dict(cfg), progress=False)
    start = AutoModelForCausalLM.from_pretrained(pruned / "wanda").state_dict()
    end = AutoModelForCausalLM.from_pretrained(run.final).state_dict()
    zeros = {k: start[k] == 0 for k in start if start[k].dim() == 2 and (start[k] == 0).any()}
    assert zeros and all(bool((end[k][z] == 0).all()) for k, z in zeros.items())
    assert any(not torch.equal(end[k], start[k]) for k in zeros)  # it did train
    assert metrics(run.path, "start")[0]["keep_sparsity"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    interrupt_after(train(config_from_dict(dict(cfg, out_dir=str(tmp_path / "again"))), progress=False), "step_000004")
    resumed = train(config_from_dict(dict(cfg, out_dir=str(tmp_path / "again"), init="resume")), progress=False)
    assert_same_run(resumed.path, run.path)
    # without the flag the zeros grow back; with it on an unpruned model, a refusal
    free = train(config_from_dict(dict(cfg, out_dir=str(tmp_path / "free"), train=dict(cfg["train"], keep_sparsity=False))),
                 progress=False)
    grown = AutoModelForCausalLM.from_pretrained(free.final).state_dict()
    assert any(bool((grown[k][z] != 0).any()) for k, z in zeros.items())
    bad = dict(cfg, out_dir=str(tmp_path / "bad"), model={"path": str(pruned / "base" / "final")})
    assert_user_error(run_cli("train", str(write_config(tmp_path / "bad.yaml", bad)), "-q"), "no weight matrix")


def test_a_soft_prompt_trains_alone_and_idp_chooses_deterministically(pruned, shards, tmp_path):
    from rewarm.repair.idp import choose, prompt_attention
    from rewarm.repair.prompts import load_prompt

    model_dir = pruned / "wanda"
    before = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    outs = []
    for name, seed in (("code", 0), ("prose", 1)):
        data = shards["downstream" if name == "code" else "upstream"]
        proc = run_cli("repair", "prompt", str(model_dir), "--data", f"{name}={data}", "-o", str(tmp_path / name),
                       "--virtual-tokens", "4", "--steps", "8", "--batch", "4", "--seq-len", "32", "--lr", "0.05",
                       "--seed", str(seed), "-q")
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(tmp_path / name)
    after = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model's weights are bit-identical
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = torch.stack([load_prompt(p, model)[0] for p in outs])
    info = json.loads((outs[0] / "prompt.json").read_text())
    assert info["held_out_loss_with"] < info["held_out_loss_without"]  # it learnt something on its own domain
    ids = torch.randint(0, 512, (20,)).tolist()
    attn_before = model.config._attn_implementation
    scores = prompt_attention(model, prompts, ids)
    assert scores.shape == (2,) and (scores > 0).all()
    assert {choose(model, prompts, ids) for _ in range(3)} == {int(scores.argmax())}
    assert model.config._attn_implementation == attn_before  # the eager switch for selection is undone
    # a prompt is refused by another model
    base = AutoModelForCausalLM.from_pretrained(pruned / "base" / "final")
    from rewarm.errors import UserError

    with pytest.raises(UserError, match="trained for another model"):
        load_prompt(outs[0], base)


@pytest.fixture(scope="module")
def task_data():
    from rewarm.downstream import tasks

    if not tasks.is_installed():
        proc = run_cli("tasks", "install", timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return tasks.tasks_dir()


def test_downstream_through_one_prompt_and_through_idp(pruned, shards, tmp_path, task_data):
    """`rewarm downstream --prompt`: a soft prompt before every input changes the scores; with two
    prompts each question picks one (the histogram covers every question, the same choice twice)."""
    model_dir = pruned / "wanda"
    dirs = []
    for name, seed in (("code", 0), ("prose", 1)):
        data = shards["downstream" if name == "code" else "upstream"]
        assert run_cli("repair", "prompt", str(model_dir), "--data", f"{name}={data}", "-o", str(tmp_path / name),
                       "--virtual-tokens", "4", "--steps", "4", "--batch", "4", "--seq-len", "32", "--lr", "0.05",
                       "--seed", str(seed), "-q").returncode == 0
        dirs.append(str(tmp_path / name))
    plain = run_cli("downstream", str(model_dir), "--tasks", "arc_easy", "--limit", "6", "--batch", "4", "-o",
                    str(tmp_path / "plain.json"), "--cpu")
    assert plain.returncode == 0, plain.stderr[-2000:]
    single = run_cli("downstream", str(model_dir), "--tasks", "arc_easy", "--limit", "6", "--batch", "4",
                     "--prompt", dirs[0], "-o", str(tmp_path / "single.json"), "--cpu")
    assert single.returncode == 0, single.stderr[-2000:]
    idp = [run_cli("downstream", str(model_dir), "--tasks", "arc_easy", "--limit", "6", "--batch", "4",
                   "--prompt", dirs[0], "--prompt", dirs[1], "-o", str(tmp_path / f"idp{i}.json"), "--cpu")
           for i in range(2)]
    assert all(p.returncode == 0 for p in idp), idp[0].stderr[-2000:]
    a, s = (json.loads((tmp_path / f).read_text()) for f in ("plain.json", "single.json"))
    assert s["prompting"]["mode"] == "single" and s["tasks"]["arc_easy"]["n"] == 6
    assert s["tasks"]["arc_easy"]["logp_gold"] != a["tasks"]["arc_easy"]["logp_gold"]
    first, second = (json.loads((tmp_path / f"idp{i}.json").read_text()) for i in range(2))
    hist = first["prompting"]["chosen_prompts"]["arc_easy"]
    assert sum(hist.values()) == 6 and set(hist) <= {"code", "prose"}  # one choice per question
    assert first["prompting"] == second["prompting"] and first["tasks"] == second["tasks"]  # deterministic
    assert "chosen prompts, arc_easy:" in idp[0].stdout
    assert_user_error(run_cli("downstream", str(model_dir), "--tasks", "arc_easy", "--prompt", dirs[0], "--prompt", dirs[0]),
                      "the same prompt is given twice")
    assert_user_error(run_cli("downstream", str(model_dir), "--tasks", "arc_easy,triviaqa", "--prompt", dirs[0]),
                      "triviaqa generate text")


def test_repair_report_compares_every_route(pruned, shards, tmp_path, task_data):
    from rewarm.config import config_from_dict
    from rewarm.train import train

    model_dir = pruned / "wanda"
    run = train(config_from_dict(small_run_config(tmp_path / "re", shards, init="weights", **{
        "model": {"path": str(model_dir)}, "train.keep_sparsity": True, "train.max_steps": 2, "eval.interval": 2,
        "schedule.warmup": 1, "checkpoint.interval": 0})), progress=False)
    prompts = []
    for name in ("code", "prose"):
        data = shards["downstream" if name == "code" else "upstream"]
        assert run_cli("repair", "prompt", str(model_dir), "--data", f"{name}={data}", "-o", str(tmp_path / name),
                       "--virtual-tokens", "4", "--steps", "2", "--batch", "2", "--seq-len", "32", "-q").returncode == 0
        prompts.append(str(tmp_path / name))
    spec = {"out_dir": str(tmp_path / "report"), "base": str(pruned / "base" / "final"),
            "eval": [{"name": n, "path": str(p)} for n, p in shards.items()], "tasks": ["arc_easy"], "limit": 4,
            "seq_len": 32, "eval_tokens": 256, "batch": 4, "precision": "bf16",  # prompts checked before the cast
            "compressed": [{"name": "wanda", "model": str(model_dir), "retrained": [str(run.path)], "prompts": prompts}]}
    proc = run_cli("repair", "report", str(write_config(tmp_path / "spec.yaml", spec)), "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    full = json.loads((tmp_path / "report" / "results.json").read_text())
    results = full["routes"]
    assert list(results) == ["base", "wanda", "wanda+retrain:re", "wanda+prompt:code", "wanda+idp"]
    assert results["wanda+retrain:re"]["tokens_trained"] == 2 * 8 * 32
    assert results["wanda"]["held_out"]["downstream"] != results["base"]["held_out"]["downstream"]
    assert sum(results["wanda+idp"]["prompting"]["chosen_prompts"]["arc_easy"].values()) == 4
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| wanda+idp |" in text and "IDP's choices" in text
    again = run_cli("repair", "report", str(tmp_path / "spec.yaml"), "-q")  # every route reused
    assert again.returncode == 0 and json.loads((tmp_path / "report" / "results.json").read_text()) == full

    def refused(change, needle):
        bad = json.loads(json.dumps(spec))
        change(bad)
        assert_user_error(run_cli("repair", "report", str(write_config(tmp_path / "bad.yaml", bad))), needle)

    refused(lambda b: b["compressed"][0].update(retrained=[str(tmp_path / "nope")]), "not a finished run")
    refused(lambda b: b.update(limit=8), "numbers made with other settings")
    refused(lambda b: b["compressed"][0].update(name="base"), "reserved `base`")
    refused(lambda b: b.update(tasks="arc_easy"), "`tasks` must be a list")
    refused(lambda b: b.update(batch=0), "`batch` must be a positive integer")
    refused(lambda b: b["compressed"][0].update(typo=1), "each `compressed` entry is")
