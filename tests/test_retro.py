"""RETRO-fitting (rewarm.retro): step-0 equivalence, CCA causality, the database (flat vs IVF-PQ,
BM25, same-document exclusion), a retro-fitting run end to end (frozen base stays bit-identical,
retrieval compared with and without, resume bit-exact) and the inputs that are refused."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import assert_same_run, assert_user_error, code_files, interrupt_after, metrics, run_cli, small_run_config, write_config
from rewarm.data.shards import TokenShards
from rewarm.retro.database import RetrievalDB, build, chunk_hashes
from rewarm.retro.modeling import RetroForCausalLM
from rewarm.retro.retriever import Retriever
from rewarm.retro.retrofit import retrofit, step0_gap

CHUNK = 16


def _base_model(tmp_path, tokenizer_dir, model_type: str):
    """A randomly initialised 3-layer decoder of the family, saved with the test tokenizer."""
    from rewarm.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), hidden_size=32, num_hidden_layers=3,
                               num_attention_heads=4, max_position_embeddings=128, intermediate_size=64,
                               **({"num_key_value_heads": 2} if model_type == "llama" else {}))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    out = tmp_path / f"base_{model_type}"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shards):
    """A real 2-layer GPT-NeoX trained 4 steps on code (the base to retro-fit; also the key model)."""
    root = tmp_path_factory.mktemp("retro")
    cfg = small_run_config(root / "base", shards, **{"train.max_steps": 4, "eval.interval": 2, "checkpoint.interval": 0})
    assert run_cli("train", str(write_config(root / "base.yaml", cfg)), "-q").returncode == 0
    return root, root / "base" / "final"


@pytest.mark.parametrize("model_type", ["gpt_neox", "llama"])
def test_retrofitted_model_equals_its_base_at_step_0_and_cca_is_causal(tmp_path, tokenizer_dir, model_type):
    base_dir = _base_model(tmp_path, tokenizer_dir, model_type)
    r = retrofit(str(base_dir), tmp_path / "retro", chunk=CHUNK, cca_layers=[2, 3])
    assert r["step0_max_logit_gap"] < 1e-5
    retro = AutoModelForCausalLM.from_pretrained(tmp_path / "retro")  # loads after `import rewarm`
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    assert isinstance(retro, RetroForCausalLM)
    assert step0_gap(base, retro) < 1e-5  # reloaded: still the base, with neighbours flowing through CCA

    # give CCA weight, then change only chunk 1's neighbours: nothing before chunk 1's last token moves
    with torch.no_grad():
        for layer in retro.backbone.retrieval_modules()[1:]:
            layer.attn.o.weight.normal_(0, 0.5)
    g = torch.Generator().manual_seed(1)
    vocab = retro.config.vocab_size
    ids = torch.randint(0, vocab, (2, 3 * CHUNK + 5), generator=g)
    nb = torch.randint(0, vocab, (2, 3, 2, 2 * CHUNK), generator=g)
    nb2 = nb.clone()
    nb2[:, 1] = torch.randint(0, vocab, nb2[:, 1].shape, generator=g)
    retro.eval()
    a, b = retro(input_ids=ids, neighbours=nb).logits, retro(input_ids=ids, neighbours=nb2).logits
    first = 1 * CHUNK + CHUNK - 1  # chunk 1's last token is the first to read its neighbours
    assert torch.equal(a[:, :first], b[:, :first])
    assert not torch.allclose(a[:, first], b[:, first])
    assert not torch.allclose(a[:, first:], b[:, first:])
    # and chunk 0's neighbours reach position CHUNK - 1 on
    nb3 = nb.clone()
    nb3[:, 0] = torch.randint(0, vocab, nb3[:, 0].shape, generator=g)
    c = retro(input_ids=ids, neighbours=nb3).logits
    assert torch.equal(a[:, : CHUNK - 1], c[:, : CHUNK - 1]) and not torch.allclose(a[:, CHUNK - 1], c[:, CHUNK - 1])
    # left padding: a chunk holding a pad token retrieved with it, so nothing reads its neighbours
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    d = retro(input_ids=ids, neighbours=nb, attention_mask=mask).logits
    e = retro(input_ids=ids, neighbours=nb3, attention_mask=mask).logits  # only chunk 0's neighbours differ
    assert torch.equal(d[1], e[1]) and not torch.allclose(d[0, CHUNK - 1], e[0, CHUNK - 1])


def test_database_flat_and_ivfpq_agree_and_same_document_neighbours_are_excluded(tmp_path, trained, shards):
    _, base = trained
    flat = build(shards["downstream"], tmp_path / "flat", chunk=CHUNK, embed=str(base), index="flat", progress=False)
    pq = build(shards["downstream"], tmp_path / "pq", chunk=CHUNK, embed=str(base), index="ivfpq", progress=False)
    assert flat.chunks == pq.chunks > 1000 and flat.index == "flat" and pq.index == "ivfpq"
    db_flat, db_pq = RetrievalDB(flat.path), RetrievalDB(pq.path)
    assert db_pq.meta["index"]["type"] == "ivfpq" and db_flat.meta["keys"]["layer"] == 1
    # neighbours are chunk + continuation, straight from the training split
    train = np.asarray(TokenShards(shards["downstream"]).split("train"))
    assert np.array_equal(db_flat.neighbours(np.array([3])), train[None, 3 * CHUNK : 5 * CHUNK])

    # recall of IVF-PQ's top-1 against the exact index, over 300 queries
    rng = np.random.default_rng(0)
    queries = np.stack([train[i * CHUNK : (i + 1) * CHUNK] for i in rng.integers(0, flat.chunks, 300)])
    exact = Retriever(db_flat, k=1, exclude_same_doc=False)._search(queries, 1)[:, 0]
    approx = Retriever(db_pq, k=1, exclude_same_doc=False)._search(queries, 1)[:, 0]
    assert np.mean(exact == approx) >= 0.9

    # a training window: without exclusion its own chunk is the nearest neighbour; with it, no neighbour
    # touches the window's documents
    window = torch.from_numpy(train[40 * CHUNK : 42 * CHUNK].astype(np.int64))[None]
    plain = Retriever(db_flat, k=2, exclude_same_doc=False)(window)
    assert torch.equal(plain[0, 0, 0, :CHUNK], window[0, :CHUNK])
    r = Retriever(db_flat, k=2, exclude_same_doc=True)
    out = r(window)
    docs = db_flat.docs
    row_docs = {int(d) for j in (40, 41) for d in range(docs[j][0], docs[j][2] + 1)}
    hashes = chunk_hashes(window[0].numpy().reshape(2, CHUNK))
    for c in range(2):
        for j in r._cache[(int(hashes[c]), r._row_documents(hashes))]:
            assert not set(range(docs[j][0], docs[j][2] + 1)) & row_docs
    assert out.shape == (1, 2, 2, 2 * CHUNK) and r.stats["excluded"] > 0
    again = r(window)  # cached: same answer, no new search
    assert torch.equal(out, again) and r.stats["cache_hits"] == 2
    r(window, count=False)  # evaluation's queries are not counted in the (training) rates
    assert r.stats["cache_hits"] == 2 and r.stats["queries"] == 4

    # a database that is all the window's own documents: the neighbours are EOS, never the window's text
    tiny = RetrievalDB(build(shards["downstream"], tmp_path / "tiny", chunk=CHUNK, bm25=True, max_chunks=3,
                             progress=False).path)
    first = torch.from_numpy(train[: 2 * CHUNK].astype(np.int64))[None]
    own = {int(d) for j in range(3) for d in range(tiny.docs[j][0], tiny.docs[j][2] + 1)}
    got = Retriever(tiny, k=2, exclude_same_doc=True)(first)
    eos = tiny.meta["eos_token_id"]
    assert own == {0} and (got == eos).all()  # (the code corpus's first document is longer than 4 chunks)

    # BM25 keys: the chunk itself comes first
    bm = build(shards["downstream"], tmp_path / "bm25", chunk=CHUNK, bm25=True, max_chunks=2000, progress=False)
    top = Retriever(RetrievalDB(bm.path), k=1, exclude_same_doc=False)(window)
    assert torch.equal(top[0, 0, 0, :CHUNK], window[0, :CHUNK])


@pytest.fixture(scope="module")
def retro_model(trained, shards):
    """A database over the code shards (keys: the trained base at layer 1) and the base retro-fitted on it."""
    root, base = trained
    db = root / "db"
    assert run_cli("retrieval", "build", str(shards["downstream"]), "-o", str(db), "--chunk", str(CHUNK),
                   "--embed", str(base), "-q").returncode == 0
    proc = run_cli("retrofit", str(base), "-o", str(root / "retro"), "--db", str(db), "--cca-layers", "2")
    assert proc.returncode == 0, proc.stderr
    assert "step-0 logit gap" in proc.stdout
    return root / "retro"


def test_retrofitting_run_trains_only_the_new_layers_compares_retrieval_and_resumes_exactly(tmp_path, retro_model, shards):
    cfg = small_run_config(tmp_path / "run", shards, **{
        "init": "weights", "model": {"path": str(retro_model)}, "train.max_steps": 6,
        "retrieval.repetition_prompts": 2, "retrieval.repetition_tokens": 8})
    assert run_cli("train", str(write_config(tmp_path / "run.yaml", cfg)), "-q").returncode == 0
    before = AutoModelForCausalLM.from_pretrained(retro_model).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").state_dict()
    new = [k for k in before if ".cca." in k or k.startswith("backbone.encoder.")]
    assert new and all(not torch.equal(before[k], after[k]) for k in new if k.endswith("attn.o.weight"))
    assert all(torch.equal(before[k], after[k]) for k in before if k not in new)  # the base stayed frozen

    events = metrics(tmp_path / "run", "retrieval")
    evals = metrics(tmp_path / "run", "eval")
    assert [e["step"] for e in events] == [e["step"] for e in evals] == [0, 3, 6]
    assert events[0]["without"] == pytest.approx({k: v["loss"] for k, v in evals[0]["sets"].items()}, abs=1e-5)
    assert all(events[-1]["without"][k] != evals[-1]["sets"][k]["loss"] for k in events[-1]["without"])
    assert events[0]["random"] == events[0]["without"]  # step 0: CCA adds nothing, whatever the neighbours
    assert events[-1]["random"].keys() == events[-1]["without"].keys()
    # frozen base: without retrieval it is the base model at every step
    assert events[-1]["without"] == pytest.approx(events[0]["without"], abs=1e-5)
    rep = events[-1]["repetition"]
    assert all(0 <= rep[k] <= 1 for k in ("with", "random", "without")) and rep["prompts"] == 2
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["retrieval"]["loss_without"] == events[-1]["without"] and "repetition" in summary["retrieval"]
    train = metrics(tmp_path / "run", "train", drop_timing=False)
    assert 0 <= train[0]["retrieval_cache_hit"] <= 1 and train[0]["retrieval_ms_per_chunk"] > 0

    assert run_cli("report", str(tmp_path / "run"), "-o", str(tmp_path / "report")).returncode == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "with and without neighbours" in report and f"{events[-1]['without']['downstream']:.4f}" in report
    assert f"{events[-1]['random']['downstream']:.4f}" in report

    # killed after step 3 and resumed: the same run to the bit
    from rewarm.rundir import RunDir

    interrupt_after(RunDir(tmp_path / "run"), "step_000006")
    assert run_cli("train", str(tmp_path / "run.yaml"), "--resume", "-q").returncode == 0
    cfg2 = dict(cfg, out_dir=str(tmp_path / "again"))
    assert run_cli("train", str(write_config(tmp_path / "again.yaml", cfg2)), "-q").returncode == 0
    assert_same_run(tmp_path / "run", tmp_path / "again")


def test_retrofitting_on_two_ranks_matches_one_process(tmp_path, retro_model, shards):
    """DDP with 2 gloo ranks (each retrieving for its own rows), everything trained (InstructRetro's
    recipe): the same losses and weights as one process with the same global batch."""
    losses, weights = {}, {}
    for name, nproc in (("one", None), ("two", "2")):
        cfg = small_run_config(tmp_path / name, shards, **{
            "init": "weights", "model": {"path": str(retro_model)}, "train.max_steps": 3, "train.micro_batch": 2,
            "retrofit.freeze_base": False, "eval.interval": 100, "retrieval.repetition_prompts": 0,
            "checkpoint.interval": 0})
        args = ["train", str(write_config(tmp_path / f"{name}.yaml", cfg)), "-q"] + (["--nproc", nproc] if nproc else [])
        proc = run_cli(*args, timeout=300, subprocess=bool(nproc))
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses[name] = [e["loss"] for e in metrics(tmp_path / name, "train")]
        weights[name] = AutoModelForCausalLM.from_pretrained(tmp_path / name / "final").state_dict()
    assert losses["two"] == pytest.approx(losses["one"], abs=1e-5)
    for key, value in weights["one"].items():
        assert torch.allclose(value, weights["two"][key], atol=1e-5), key
    base = AutoModelForCausalLM.from_pretrained(retro_model).state_dict()
    assert any(not torch.equal(v, weights["two"][k]) for k, v in base.items() if "layers.0." in k)  # the base trained too


def test_bad_retrieval_inputs_exit_2(tmp_path, trained, retro_model, shards):
    root, base = trained
    out = tmp_path / "db"
    assert_user_error(run_cli("retrieval", "build", str(shards["downstream"]), "-o", str(out), "--chunk", "1",
                              "--bm25"), "--chunk")
    assert_user_error(run_cli("retrieval", "build", str(shards["downstream"]), "-o", str(out), "--bm25",
                              "--embed", str(base)), "--embed", "--bm25")
    assert not out.exists()
    # a database over text tokenized by another tokenizer
    from rewarm.data.prepare import prepare
    from rewarm.tokenizer import train_tokenizer

    other_tok = train_tokenizer(["some other text entirely " * 50, "with another vocabulary " * 50], 300, tmp_path / "tok2")
    other = tmp_path / "other"
    prepare([str(f) for f in code_files(60_000)], str(other_tok), other, val_tokens=2000, progress=False)
    assert run_cli("retrieval", "build", str(other), "-o", str(tmp_path / "otherdb"), "--chunk", str(CHUNK), "--bm25",
                   "--max-chunks", "500", "-q").returncode == 0
    assert_user_error(run_cli("retrofit", str(base), "-o", str(tmp_path / "r1"), "--db", str(tmp_path / "otherdb")),
                      "another tokenizer")
    proc = run_cli("retrofit", str(base), "-o", str(tmp_path / "r2"), "--chunk", str(CHUNK), "--cca-layers", "2")
    assert proc.returncode == 0
    cfg = small_run_config(tmp_path / "run", shards, **{"init": "weights", "model": {"path": str(tmp_path / "r2")},
                                                         "retrieval.db": str(tmp_path / "otherdb")})
    assert_user_error(run_cli("train", str(write_config(tmp_path / "a.yaml", cfg)), "-q"), "another tokenizer")
    cfg = small_run_config(tmp_path / "run", shards, **{"init": "weights", "model": {"path": str(tmp_path / "r2")}})
    assert_user_error(run_cli("train", str(write_config(tmp_path / "b.yaml", cfg)), "-q"), "retrieval.db")
    # a dense model cannot read neighbours
    cfg = small_run_config(tmp_path / "run", shards, **{"init": "weights", "model": {"path": str(base)},
                                                         "retrieval.db": str(tmp_path / "otherdb")})
    assert_user_error(run_cli("train", str(write_config(tmp_path / "c.yaml", cfg)), "-q"), "rewarm retrofit")
    cfg = small_run_config(tmp_path / "run", shards, **{"init": "weights", "model": {"path": str(retro_model)},
                                                         "train.seq_len": 24})
    assert_user_error(run_cli("train", str(write_config(tmp_path / "d.yaml", cfg)), "-q"), "multiple of the database's chunk")
    assert not (tmp_path / "run").exists()
    assert_user_error(run_cli("retrofit", str(base), "-o", str(tmp_path / "r3"), "--cca-layers", "7"), "--cca-layers")
    assert_user_error(run_cli("retrofit", str(base), "-o", str(tmp_path / "r4"), "--cca-layers", "x"), "--cca-layers")
    assert_user_error(run_cli("retrofit", str(base), "-o", str(tmp_path / "r4"), "--cca-layers", ","), "--cca-layers")

    # --overwrite replaces only what it made: never the shards, a model, or the base itself
    for args in (("retrieval", "build", str(shards["downstream"]), "-o", str(other), "--bm25", "--overwrite"),
                 ("retrofit", str(base), "-o", str(base), "--overwrite"),
                 ("retrofit", str(base), "-o", str(other), "--overwrite")):
        assert_user_error(run_cli(*args), "--overwrite" if "build" in args or str(other) in args else "base model")
    assert (other / "meta.json").is_file() and (base / "config.json").is_file()
    assert_user_error(run_cli("retrieval", "build", str(shards["downstream"]), "-o", str(tmp_path / "pq"), "--embed",
                              str(base), "--index", "ivfpq", "--max-chunks", "100"), "--index flat")

    # a damaged database, and one that is gone: refused wherever the model is used
    import shutil

    bm = tmp_path / "bm"
    assert run_cli("retrieval", "build", str(shards["downstream"]), "-o", str(bm), "--chunk", str(CHUNK), "--bm25",
                   "--max-chunks", "1500", "-q").returncode == 0
    assert run_cli("retrofit", str(base), "-o", str(tmp_path / "r5"), "--db", str(bm), "--cca-layers", "2",
                   "--k", "3").returncode == 0
    cfg = small_run_config(tmp_path / "run5", shards, **{"init": "weights", "model": {"path": str(tmp_path / "r5")},
                                                          "train.max_steps": 4, "checkpoint.interval": 2,
                                                          "retrieval.repetition_prompts": 0})
    assert run_cli("train", str(write_config(tmp_path / "r5.yaml", cfg)), "-q").returncode == 0
    assert json.loads((tmp_path / "run5" / "final" / "config.json").read_text())["retrieval_k"] == 3  # the model's k
    from rewarm.rundir import RunDir

    interrupt_after(RunDir(tmp_path / "run5"), "step_000004")
    assert run_cli("retrieval", "build", str(shards["downstream"]), "-o", str(bm), "--chunk", str(CHUNK), "--bm25",
                   "--max-chunks", "1200", "--overwrite", "-q").returncode == 0
    assert_user_error(run_cli("train", str(tmp_path / "r5.yaml"), "--resume", "-q"), "was rebuilt")
    (bm / "docs.npy").unlink()
    assert_user_error(run_cli("eval", str(tmp_path / "r5"), "--data", f"code={shards['downstream']}"), "damaged")
    shutil.rmtree(bm)
    assert_user_error(run_cli("eval", str(tmp_path / "r5"), "--data", f"code={shards['downstream']}"), "does not exist")
