"""Upcycling into a mixture of experts (rewarm.moe): the identical-branches check, per-expert
attention against the branch it came from, top-k routing, save/load/generate, global- vs
micro-batch load balancing (2 gloo ranks × 2 micro-batches against one process), resume, the
`rewarm upcycle` pipeline and the branches it refuses."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig

import rewarm  # noqa: F401  (registers the MoE class with the Auto classes)
from conftest import assert_same_run, assert_user_error, interrupt_after, metrics, run_cli, small_run_config, write_config
from rewarm.errors import UserError
from rewarm.moe.attention import MixtureOfAttention
from rewarm.moe.families import family_of
from rewarm.moe.mix import identity_gap, mix
from rewarm.moe.routing import TopKMoE


def _neox(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               rotary_pct=0.25, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(GPTNeoXConfig(**{**cfg, **kw})).eval()


def _llama(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(LlamaConfig(**{**cfg, **kw})).eval()


def _perturbed(model, seed):
    """A 'branch': the seed with every weight moved a little (as continual training would)."""
    out = AutoModelForCausalLM.from_config(model.config).eval()
    out.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return out


@pytest.mark.parametrize("make", [_neox, _llama], ids=["gpt_neox", "llama"])
@pytest.mark.parametrize("mode,kv", [("bam", False), ("bam", True), ("btx", False)])
def test_identical_branches_compute_the_dense_model(make, mode, kv):
    dense = make()
    assert identity_gap(dense, n=3, mode=mode, kv_sharing=kv) < 1e-5  # any router: weights sum to 1
    # and the check can fail: branches that differ give other logits
    moe = mix([("a", dense), ("b", _perturbed(dense, 1)), ("c", _perturbed(dense, 2))], mode=mode, kv_sharing=kv).eval()
    ids = torch.randint(0, 97, (2, 16))
    assert (moe(input_ids=ids).logits - dense(input_ids=ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("make", [_neox, _llama], ids=["gpt_neox", "llama"])
@pytest.mark.parametrize("kv", [False, True])
def test_each_attention_expert_is_its_branchs_attention(make, kv):
    """With a uniform router and every other expert's output projection zeroed, N × the mixture is
    branch e's own attention: the stacked heads (and, with KV sharing, their grouping) are in order."""
    dense = make()
    branches = [_perturbed(dense, s) for s in (1, 2, 3)]
    fam = family_of(dense.config)
    if kv:  # KV sharing takes keys/values from the average: give every branch the same ones
        for b in branches[1:]:
            src, dst = getattr(branches[0].base_model.layers[0], fam.attention), getattr(b.base_model.layers[0], fam.attention)
            with torch.no_grad():
                if fam.name == "gpt_neox":
                    h, d = 4, 8
                    w, ws = dst.query_key_value.weight.view(h, 3, d, -1), src.query_key_value.weight.view(h, 3, d, -1)
                    w[:, 1:].copy_(ws[:, 1:])
                    bias, bs = dst.query_key_value.bias.view(h, 3, d), src.query_key_value.bias.view(h, 3, d)
                    bias[:, 1:].copy_(bs[:, 1:])
                else:
                    dst.k_proj.weight.copy_(src.k_proj.weight)
                    dst.v_proj.weight.copy_(src.v_proj.weight)
    moe = mix([(f"b{i}", b) for i, b in enumerate(branches)], mode="bam", kv_sharing=kv).eval()
    moa = getattr(moe.backbone.inner.layers[0], fam.attention)
    assert isinstance(moa, MixtureOfAttention)
    x = torch.randn(2, 10, 32)
    pos = torch.arange(10).unsqueeze(0)
    cos_sin = dense.base_model.rotary_emb(x, position_ids=pos)
    with torch.no_grad():
        moa.router.weight.zero_()
        for e, branch in enumerate(branches):
            saved = moa.o_weight.detach().clone()
            keep = torch.zeros(3, 1, 1)
            keep[e] = 1
            moa.o_weight.mul_(keep)
            if moa.o_bias is not None:
                saved_b = moa.o_bias.detach().clone()
                moa.o_bias.view(3, -1).mul_(keep[:, :, 0])
            got = 3 * moa(x, None, cos_sin)[0]
            want = getattr(branch.base_model.layers[0], fam.attention)(x, attention_mask=None, position_embeddings=cos_sin)[0]
            moa.o_weight.copy_(saved)
            if moa.o_bias is not None:
                moa.o_bias.copy_(saved_b)
            assert torch.allclose(got, want, atol=1e-5), (e, (got - want).abs().max())


def test_top_k_sends_every_token_to_exactly_k_distinct_experts():
    layer = TopKMoE([torch.nn.Linear(8, 8) for _ in range(4)], 8, top_k=2).train()
    x = torch.randn(3, 50, 8)
    _, _, chosen, weights = layer.route(x.reshape(-1, 8))
    assert chosen.shape == (150, 2)
    assert all(len(set(row.tolist())) == 2 for row in chosen)
    assert torch.allclose(weights.sum(-1), torch.ones(150))
    layer(x)
    assert sum(layer.stats()["load"]) == pytest.approx(1.0)
    assert int(torch.stack(layer.stat_counts).sum()) == 150 * 2


def test_capacity_drops_and_counts_what_overflows():
    layer = TopKMoE([torch.nn.Linear(8, 8) for _ in range(2)], 8, top_k=1).train()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 10.0  # every token with x0 > 0 to expert 0
    layer.capacity_factor = 0.5  # each expert takes at most a quarter of the 64 tokens: 16
    x = torch.randn(64, 8)
    x[:, 0] = 1.0
    y = layer(x)
    assert layer.stats()["dropped"] == pytest.approx((64 - 16) / 64)
    assert torch.count_nonzero(y.abs().sum(-1)) == 16  # the dropped tokens got nothing from the FFN
    layer.eval()  # evaluation and generation never drop: a token's output does not depend on its batch
    assert torch.allclose(layer(x)[40:], layer(x[40:]))


def test_micro_batch_scope_differs_from_global_on_a_batch_built_to_differ():
    """Micro-batch 1 routes all its tokens to expert 0, micro-batch 2 to expert 1: each alone is
    maximally unbalanced (LBL ≈ N_E = 2), the step as a whole is balanced (LBL ≈ 1)."""
    layer = TopKMoE([torch.nn.Linear(8, 8) for _ in range(2)], 8, top_k=1).train()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0], layer.router.weight[1, 0] = 5.0, -5.0
    a, b = torch.randn(32, 8), torch.randn(32, 8)
    a[:, 0], b[:, 0] = 1.0, -1.0
    micro = []
    for x in (a, b):
        layer(x)
        micro.append(float(layer.lbl.detach()))
    layer.scope = "global_batch"
    layer.global_f = torch.tensor([0.5, 0.5])
    glob = []
    for x in (a, b):
        layer(x)
        glob.append(float(layer.lbl.detach()))
    layer.scope, layer.global_f = "micro_batch", None
    layer(torch.cat([a, b]))
    whole = float(layer.lbl.detach())
    assert sum(micro) / 2 > 1.9 and whole == pytest.approx(sum(glob) / 2, abs=1e-6) and whole < 1.01


def test_saves_loads_and_generates(tmp_path):
    dense = _llama()
    moe = mix([("a", _perturbed(dense, 1)), ("b", _perturbed(dense, 2)), ("c", _perturbed(dense, 3))], mode="bam",
              kv_sharing=True).eval()
    moe.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(again).__name__ == "UpcycledMoEForCausalLM" and again.config.expert_names == ["a", "b", "c"]
    ids = torch.randint(0, 97, (2, 12))
    assert torch.equal(moe(input_ids=ids).logits, again(input_ids=ids).logits)
    assert again.lm_head.weight is again.get_input_embeddings().weight  # the seed's tie survives
    out = again.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    no_cache = again.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
    assert out.shape == (2, 18) and torch.equal(out, no_cache)  # the KV cache of the stacked heads is right


def test_mixing_refuses_branches_of_another_architecture():
    with pytest.raises(UserError, match="intermediate_size"):
        mix([("a", _neox()), ("b", _neox(intermediate_size=48))])
    with pytest.raises(UserError, match="GPT-NeoX and Llama"):
        family_of(type("C", (), {"model_type": "gpt2"})())


# -- the pipeline on real runs ------------------------------------------------------------------

RUN = {"train.max_steps": 4, "eval.interval": 2, "checkpoint.interval": 2, "train.num_threads": 1,
       "schedule.warmup": 1}


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory, shards):
    """A 2-layer GPT-NeoX seed (4 steps from scratch on prose), two branches (prose, code), their BAM
    mixture trained 4 steps with the global-batch LBL (2 micro-batches per step)."""
    from rewarm.config import config_from_dict
    from rewarm.train import train

    root = tmp_path_factory.mktemp("upcycle")
    seed_cfg = small_run_config(root / "seed", shards, **RUN, **{"data.train": [
        {"name": "upstream", "path": str(shards["upstream"])}]})
    seed = train(config_from_dict(seed_cfg), progress=False)
    base = small_run_config(root / "unused", shards, **RUN)
    base["model"] = {"path": str(seed.final)}
    plan = {"out_dir": str(root / "up"), "base": base,
            "branches": [{"name": "prose", "data": str(shards["upstream"])},
                         {"name": "code", "data": str(shards["downstream"])}],
            "upcycle": {"mode": "bam", "top_k": 1},
            "moe_run": {"set": {"moe.lbl_scope": "global_batch", "moe.capacity_factor": 1.5}}}
    path = write_config(root / "plan.yaml", plan)
    proc = run_cli("upcycle", str(path), "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, path, proc


def test_upcycle_runs_branches_mixes_and_trains_the_mixture(upcycled):
    root, _, proc = upcycled
    up = root / "up"
    for name in ("prose", "code"):
        assert (up / "branches" / name / "summary.json").is_file()
        assert metrics(up / "branches" / name, "start")[0]["init"] == "weights"
    info = json.loads((up / "moe_model" / "upcycle.json").read_text())
    assert info["identity_check_max_abs_logit_gap"] < 1e-5 and info["params"] > info["dense_params"]
    moe = AutoModelForCausalLM.from_pretrained(up / "moe_model")
    assert moe.config.expert_names == ["prose", "code"] and moe.config.attention_experts == 2
    # the mixture's run trains on both branches' data, logs its load balancing per step
    cfg = yaml.safe_load((up / "moe" / "config.yaml").read_text())
    assert [s["name"] for s in cfg["data"]["train"]] == ["prose", "code"]
    train_events = metrics(up / "moe", "train")
    assert all(e["aux_loss"] > 0 and len(e["moe_load"]) == 2 and "moe_dropped" in e for e in train_events)
    assert all(sum(layer) == pytest.approx(1.0, abs=1e-3) for e in train_events for layer in e["moe_load"])
    routing = json.loads((up / "moe" / "routing.json").read_text())
    assert set(routing["sets"]) == {"upstream", "downstream"}
    assert all(0 <= s["mean_entropy_bits"] <= 1 for s in routing["sets"].values())
    assert "routing per eval set" in proc.stdout
    # a second call finds everything done
    again = run_cli("upcycle", str(root / "plan.yaml"), "-q")
    assert again.returncode == 0 and "skipped (already finished)" in again.stdout
    assert len(routing["sets"]["upstream"]["attention_share"]) == 2  # BAM: the attention router's weights too
    # the branches are independent: one command each for a cluster instead
    lines = run_cli("upcycle", str(root / "plan.yaml"), "--print-commands", "--nproc", "4").stdout.splitlines()
    assert lines[:2] == [f"torchrun --standalone --nproc_per_node 4 -m rewarm train {up / 'configs' / n}.yaml"
                         for n in ("prose", "code")]
    assert f"rewarm upcycle {root / 'plan.yaml'} --stage mix" in lines
    assert lines[-1].startswith(f"rewarm upcycle {root / 'plan.yaml'} --stage moe")
    plain = run_cli("upcycle", str(root / "plan.yaml"), "--print-commands").stdout.splitlines()
    assert plain[0] == f"rewarm train {up / 'configs' / 'prose.yaml'}" and not any("torchrun" in x for x in plain)


def test_the_example_plan_is_valid(tmp_path, monkeypatch):
    from pathlib import Path

    from rewarm.moe.upcycle import load_plan

    monkeypatch.chdir(tmp_path)
    plan = load_plan(Path(__file__).parents[1] / "configs" / "upcycle.yaml")
    assert [b.name for b in plan.branches] == ["prose", "code"] and plan.upcycle["mode"] == "bam"
    assert plan.moe_run().raw["moe"]["lbl_scope"] == "global_batch"


def test_report_draws_the_routing_per_domain(upcycled, tmp_path):
    root, _, _ = upcycled
    proc = run_cli("report", str(root / "up" / "moe"), "-o", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (tmp_path / "r" / "report.md").read_text()
    assert (tmp_path / "r" / "routing.png").is_file() and "Expert specialisation" in text and "| moe | upstream |" in text


def _lbl_of_whole_batch(model_dir, shards, scope_rows=8):
    """One process, one forward over the step's whole global batch (8 rows): the global-batch LBL."""
    from rewarm.data.mixture import Mixture, Source
    from rewarm.data.shards import TokenShards
    from rewarm.fused_loss import lm_loss

    model = AutoModelForCausalLM.from_pretrained(model_dir).train()
    sources = [Source(n, TokenShards(str(shards[k])), 0.5) for n, k in (("prose", "upstream"), ("code", "downstream"))]
    windows, _ = Mixture(sources, 32, 8, 0).batch(0, 0, 1)
    with torch.no_grad():
        _, aux = lm_loss(model, torch.from_numpy(windows), with_aux=True)
    return float(aux)


def test_global_batch_lbl_on_two_ranks_equals_one_forward_over_the_global_batch(upcycled, shards, tmp_path):
    """2 gloo ranks × 2 micro-batches of 2 rows: the logged LBL of step 1 is the one of all 8 rows at
    once (to 1e-6); the micro-batch scope's is not."""
    root, _, _ = upcycled
    moe_cfg = yaml.safe_load((root / "up" / "configs" / "moe.yaml").read_text())
    got = {}
    for scope, strategy in (("global_batch", "ddp"), ("micro_batch", "ddp"), ("global_batch", "fsdp")):
        name = f"{scope}_{strategy}"
        cfg = dict(moe_cfg, out_dir=str(tmp_path / name))
        cfg["train"] = dict(cfg["train"], micro_batch=2, max_steps=2)
        cfg["moe"] = dict(cfg["moe"], lbl_scope=scope, capacity_factor=0.0)
        cfg["eval"] = dict(cfg["eval"], interval=100)
        cfg["distributed"] = dict(cfg.get("distributed") or {}, strategy=strategy)
        proc = run_cli("train", str(write_config(tmp_path / f"{name}.yaml", cfg)), "-q", "--nproc", "2",
                       timeout=300, subprocess=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got[name] = metrics(tmp_path / name, "train")[0]["aux_loss"] / cfg["moe"]["lbl_coef"]  # the LBL itself
    got["micro_batch"] = got.pop("micro_batch_ddp")
    want = _lbl_of_whole_batch(root / "up" / "moe_model", shards) / moe_cfg["moe"]["lbl_coef"]
    assert got["global_batch_ddp"] == pytest.approx(want, abs=1e-6)
    assert got["global_batch_fsdp"] == pytest.approx(want, abs=1e-6)
    assert abs(got["micro_batch"] - want) > 1e-4  # here ~1e-3: each micro-batch's own load is less even


def test_mixture_run_resumes_bit_exactly(upcycled, tmp_path):
    from rewarm.config import config_from_dict
    from rewarm.train import train

    root, _, _ = upcycled
    cfg = yaml.safe_load((root / "up" / "configs" / "moe.yaml").read_text())
    cfg["out_dir"] = str(tmp_path / "again")
    interrupt_after(train(config_from_dict(cfg), progress=False), "step_000004")
    resumed = train(config_from_dict(dict(cfg, init="resume")), progress=False)
    assert_same_run(resumed.path, root / "up" / "moe")


def test_upcycle_refuses_bad_plans_and_unlike_branches(upcycled, tmp_path, shards):
    root, path, _ = upcycled
    plan = yaml.safe_load(path.read_text())

    def refused(change, *needles):
        bad = json.loads(json.dumps(plan))
        bad["out_dir"] = str(tmp_path / "bad")
        change(bad)
        assert_user_error(run_cli("upcycle", str(write_config(tmp_path / "bad.yaml", bad)), "-q"), *needles)

    refused(lambda p: p.update(branches=p["branches"][:1]), "at least two")
    refused(lambda p: p["upcycle"].update(mode="moa"), "upcycle.mode must be one of bam, btx")
    refused(lambda p: p["upcycle"].update(top_k=3), "upcycle.top_k")
    refused(lambda p: p["upcycle"].update(mode="btx", kv_sharing=True), "kv_sharing needs mode: bam")
    refused(lambda p: p["branches"][1].update(name="prose"), "used twice")
    refused(lambda p: p["moe_run"]["set"].update({"moe.lbl_scope": "global"}), "moe.lbl_scope", "micro_batch, global_batch")
    refused(lambda p: p.update(stray=1), "unknown top-level keys")
    refused(lambda p: p.update(moe_run=[1]), "`moe_run` must be a mapping")
    refused(lambda p: p["branches"][0].update(set=[1]), "`branches[0].set` must be a mapping")
    refused(lambda p: p["branches"][0].update(data=5), "`data` must be a prepared directory")
    refused(lambda p: p["upcycle"].update(top_k=True), "upcycle.top_k must be an integer")
    refused(lambda p: p["upcycle"].update(seed_expert="yes"), "upcycle.seed_expert must be true or false")
    refused(lambda p: p["upcycle"].update(router_init_std=-1), "router_init_std must be a number in [0, 10)")
    refused(lambda p: p.update(out_dir=5), "`out_dir` must be a directory path")
    refused(lambda p: p["base"]["model"].update(path=str(tmp_path / "nope")), "the dense seed model", "does not exist")
    refused(lambda p: p["base"]["data"].update(eval=[]), "has no eval sets")
    refused(lambda p: p["branches"][0].update(data=[{"name": "x", "path": str(shards["upstream"]), "weight": 0}]),
            "weights must sum to > 0")
    # an edited plan does not silently keep what the old one made
    changed = json.loads(json.dumps(plan))
    changed["upcycle"]["mode"] = "btx"
    assert_user_error(run_cli("upcycle", str(write_config(tmp_path / "changed.yaml", changed)), "-q"),
                      "was mixed with other settings", "mode: 'bam'")
    longer = json.loads(json.dumps(plan))
    longer["moe_run"]["set"]["moe.lbl_coef"] = 0.5
    assert_user_error(run_cli("upcycle", str(write_config(tmp_path / "longer.yaml", longer)), "-q"),
                      "the plan changed run `moe`, which already finished", "moe.lbl_coef")
    # a branch from another architecture: mixing names the parameter that differs (exit 2)
    import shutil

    gone = tmp_path / "gone"  # the mixed model deleted, its mixture run kept: not re-mixed under the run's feet
    shutil.copytree(root / "up", gone)
    shutil.rmtree(gone / "moe_model")
    saved = gone / "moe" / "config.yaml"  # as if made there: its model.path is the copy's
    saved.write_text(saved.read_text().replace(str(root / "up"), str(gone)))
    moved = json.loads(json.dumps(plan))
    moved["out_dir"] = str(gone)
    assert_user_error(run_cli("upcycle", str(write_config(tmp_path / "gone.yaml", moved)), "--stage", "mix", "-q"),
                      "holds a mixture run trained on an earlier mix")
    shutil.rmtree(gone / "moe")
    shutil.rmtree(gone / "branches" / "prose" / "final")
    assert_user_error(run_cli("upcycle", str(tmp_path / "gone.yaml"), "--stage", "mix", "-q"),
                      "branch `prose` finished but its model", "--overwrite")

    other = tmp_path / "other"
    shutil.copytree(root / "up", other)
    shutil.rmtree(other / "moe_model")
    shutil.rmtree(other / "moe")
    for f in ("config.json", "model.safetensors"):
        shutil.copy(root / "seed" / "final" / f, other / "branches" / "code" / "final" / f)
    wide = AutoModelForCausalLM.from_pretrained(other / "branches" / "code" / "final")
    wide.config.intermediate_size = 48
    AutoModelForCausalLM.from_config(wide.config).save_pretrained(other / "branches" / "code" / "final")
    odd = json.loads(json.dumps(plan))
    odd["out_dir"] = str(other)
    assert_user_error(run_cli("upcycle", str(write_config(tmp_path / "odd.yaml", odd)), "--stage", "mix", "-q"),
                      "branch `code`", "intermediate_size")


def test_a_llama_mixture_trains_through_the_loop_in_bf16(tmp_path, shards, tokenizer_dir):
    """A Llama-family seed (grouped-query attention, tied embeddings) mixed with KV sharing, trained
    2 steps in bf16 autocast on the fused head + loss path: finite losses, the tie kept in final/."""
    from transformers import AutoTokenizer

    from rewarm.config import config_from_dict
    from rewarm.train import train

    dense = _llama(vocab_size=512)
    moe = mix([("a", _perturbed(dense, 1)), ("b", _perturbed(dense, 2))], mode="bam", kv_sharing=True)
    moe.save_pretrained(tmp_path / "moe")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "moe")
    cfg = small_run_config(tmp_path / "run", shards, init="weights", **{**RUN, **{
        "model": {"path": str(tmp_path / "moe")}, "train.precision": "bf16", "train.max_steps": 2,
        "moe.z_loss_coef": 0.001}})
    run = train(config_from_dict(cfg), progress=False)
    events = metrics(run.path, "train")
    assert all(math.isfinite(e["loss"]) and e["aux_loss"] > 0 for e in events)
    final = AutoModelForCausalLM.from_pretrained(run.final)
    assert final.config.z_loss_coef == 0.001 and final.lm_head.weight is final.get_input_embeddings().weight
