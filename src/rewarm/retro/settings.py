"""A run's `retrieval:` and `retrofit:` sections applied to a RETRO model at start (the
`apply_run_settings` seam): the database attached and checked against the run's data, and the
base frozen (RETRO's recipe: only the encoder and CCA train) or not (InstructRetro's)."""
from __future__ import annotations

import logging

from rewarm.errors import UserError

log = logging.getLogger(__name__)


def apply(model, cfg) -> None:
    from rewarm.data.shards import TokenShards
    from rewarm.retro.database import RetrievalDB
    from rewarm.retro.retriever import Retriever

    r = cfg.retrieval
    path = r.db or model.config.retrieval_db
    if not path:
        raise UserError("this is a RETRO model (`rewarm retrofit`) but the run names no retrieval database: set "
                        "`retrieval.db` to a directory `rewarm retrieval build` wrote.")
    db = RetrievalDB(path)
    if cfg.data.train:
        db.check_tokenizer(TokenShards(cfg.data.train[0].path).fingerprint, "the run's training data")
    if cfg.train.seq_len % db.chunk:
        raise UserError(f"`train.seq_len` ({cfg.train.seq_len}) must be a multiple of the database's chunk "
                        f"({db.chunk}): training windows are cut into whole chunks (and found in the database "
                        f"again for same-document exclusion).")
    k = r.k or model.config.retrieval_k  # default: what `rewarm retrofit --k` chose (checked at attach)
    recorded = getattr(model.config, "retrieval_db_id", None)
    if cfg.init == "resume" and recorded and db.identity != recorded:
        raise UserError(f"the retrieval database {db.path} was rebuilt since this run's checkpoint was written (build "
                        f"{db.identity}, the run used {recorded}): resuming would continue with other neighbours. "
                        f"Restore the database, or start a new run from the checkpoint with `init: weights`.")
    model.attach_retriever(Retriever(db, k, r.exclude_same_doc))
    trainable = {id(p) for m in model.backbone.retrieval_modules() for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(not cfg.retrofit.freeze_base or id(p) in trainable)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("RETRO: database %s (%d chunks of %d, %s keys), k=%d, %s; training %s parameters (%s)", db.path, db.n,
             db.chunk, db.keys["kind"], k, "same-document neighbours excluded" if r.exclude_same_doc else
             "no exclusion", f"{n_train:,}", "base frozen" if cfg.retrofit.freeze_base else "everything")
