"""Names MLflow accepts, whatever the user called a row, a column, a sweep or a metric.

An ablation whose rows are named like a paper's table (`+ RSG`, `w/o L_r`, `λ=0.5`, `Ours (full)`) runs on the
embedded digits data through a real local Ray runtime into a real sqlite MLflow store: every param of its parent
run must arrive (MLflow refused `rows.+ RSG.augmenter.name`, and with it the whole request of 100 params), under a
readable key, with the mapping recorded on the run and printed once. The mapping itself is checked against
MLflow's own validators: valid, stable, injective on sets built to collide, within the length limits.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from mlflow.utils import validation

from ltsearch.ablate.runner import run_ablation
from ltsearch.ablate.settings import load_ablation
from ltsearch.ablate.tracking import parent_params
from ltsearch.tracking import browse, record
from ltsearch.tracking.names import MAX_KEY_LENGTH, NAMES_FILE, is_valid_key, mlflow_key, mlflow_keys, mlflow_run_name
from ltsearch.tracking.server import trials_url
from ltsearch.tracking.settings import TAG_NAMES, TrackingConfig
from ltsearch.tracking.store import Tracker

REPO = Path(__file__).resolve().parents[1]
ROWS = {"Ours (full)": {"loss.name": "ldam", "loss.ldam.max_m": 0.5},
        "+ RSG": {"augmenter.name": "rsg", "augmenter.rsg.contrastive_channels": 8, "augmenter.rsg.num_centers": 2},
        "w/o L_r": {"loss.name": "ce"},
        "λ=0.5": {"loss.name": "ldam", "loss.ldam.max_m": 0.5}}
PAPER = {
    "name": "names", "base": str(REPO / "configs" / "digits.yaml"),
    "data": {"max_train_per_class": 40, "max_eval_per_class": 20}, "model": {"width": 16},
    "train": {"epochs": 2, "device": "cpu"}, "optim": {"batch_size": 64, "schedule": {"name": "constant"}},
    "rows": ROWS, "columns": {"data.imbalance": [10]}, "seeds": {"train": [0], "data": [0]},
    "baseline": "Ours (full)", "reference": {"source": "a made-up table", "+ RSG": {10: 90.0}, "λ=0.5": {10: 91.0}},
    "resources": {"cpu": 1, "gpu": 0},
}
#: names built to collide once spelled out, and names MLflow reads as paths
TRICKY = ["+ RSG", "* RSG", "plus RSG", "times RSG", "+RSG", "plus_RSG", "λ=0.5", "lambda_eq_0.5", "lambda=0.5", "Λ=0.5",
          "Ours (full)", "Ours _full_", "Ours [full]", "a:b", "a_b", "a//b", "a/./b", "a/../b", "/abs", "trail/", ".", "..",
          "..x", "", " ", "é", "e", "中文", "tab\there", "new\nline", "x" * 300, "x" * 300 + "+", "y" * 251, "best/val/λ"]


def _sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:8]


def _validate(key: str) -> None:
    """MLflow's own checks of a param, metric and tag key, on this machine and as a Windows client reads them."""
    validation._validate_param_name(key)
    validation._validate_metric_name(key)
    validation._validate_tag_name(key)
    validation._validate_length_limit("key", validation.MAX_ENTITY_KEY_LENGTH, key)
    assert re.match(r"^[/\w.\- ]*$", key), f"{key!r} is refused by MLflow on Windows (its rule without the colon)"


# ------------------------------------------------------------------------------------------- the mapping
def test_valid_names_are_kept_and_others_are_spelled_out_readably() -> None:
    for kept in ("train/loss", "best/val/top1", "rows.w/o L_r.augmenter.name", "ltsearch.kind", "mlflow.parentRunId", "a-b_c d.e"):
        assert mlflow_key(kept) == kept
    assert mlflow_key("rows.+ RSG.augmenter.name") == "rows.plus RSG.augmenter.name"
    assert mlflow_key("rows.λ=0.5.loss.name") == "rows.lambda_eq_0.5.loss.name"
    assert mlflow_key("rows.Ours (full).loss.name") == "rows.Ours _full_.loss.name"
    assert mlflow_key("Λ<2 × β≥1") == "Lambda_lt_2 times beta_ge_1"
    assert mlflow_key("café") == "cafe" and mlflow_key("a:b") == "a_b" and mlflow_key("a//b") == "a/_/b"


@pytest.mark.parametrize("name", TRICKY)
def test_every_mapped_name_passes_mlflows_validators(name: str) -> None:
    _validate(mlflow_key(name))
    _validate(mlflow_keys([name])[name])


def test_random_names_always_map_to_valid_distinct_keys() -> None:
    draw = random.Random(0)
    alphabet = "aZ09 _-./:+=*()[]λΛé中\t\n\\'\"%<>|~"
    names = {"".join(draw.choice(alphabet) for _ in range(draw.randint(0, 12))) for _ in range(3000)}
    mapped = mlflow_keys(names)
    assert len(set(mapped.values())) == len(names), "two names share an MLflow key"
    for name, key in mapped.items():
        _validate(key)
        assert key == name or not is_valid_key(name), "a valid name is never renamed"


def test_the_mapping_is_injective_on_names_that_collide_when_spelled_out() -> None:
    mapped = mlflow_keys(TRICKY)
    assert len(set(mapped.values())) == len(TRICKY)
    assert mapped["plus RSG"] == "plus RSG" and mapped["lambda_eq_0.5"] == "lambda_eq_0.5", "a valid name is never renamed"
    assert mapped["+ RSG"] == f"plus RSG-{_sha('+ RSG')}" and mapped["* RSG"] == f"times RSG-{_sha('* RSG')}"
    assert mlflow_keys(["+ RSG", "* RSG"]) == {"+ RSG": "plus RSG", "* RSG": "times RSG"}, "the hash is added only when needed"
    assert mlflow_keys(["a+b", "a_plus_b"]) == {"a+b": f"a_plus_b-{_sha('a+b')}", "a_plus_b": "a_plus_b"}
    # two spelled-out names that meet: both get the suffix, so neither's key depends on which one came first
    assert mlflow_keys(["a:b", "a;b"]) == {"a:b": f"a_b-{_sha('a:b')}", "a;b": f"a_b-{_sha('a;b')}"}


def test_the_mapping_is_stable_and_independent_of_order() -> None:
    first = mlflow_keys(TRICKY)
    assert mlflow_keys(list(reversed(TRICKY))) == first == mlflow_keys(set(TRICKY))
    # another process with another string-hash seed: SHA-256, never Python's salted hash(), so every run agrees
    code = f"import json; from ltsearch.tracking.names import mlflow_keys; print(json.dumps(mlflow_keys({TRICKY!r})))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "123"})
    assert json.loads(other.stdout) == first
    assert first["+ RSG"] == "plus RSG-757dea0e"


def test_length_limits() -> None:
    long = "rows." + "very long row name " * 20 + ".augmenter.name"
    key = mlflow_key(long)
    assert len(key) == MAX_KEY_LENGTH and key != mlflow_key(long + "x"), "a cut name ends in its hash, so two stay apart"
    assert mlflow_key("z" * MAX_KEY_LENGTH) == "z" * MAX_KEY_LENGTH
    assert len(mlflow_run_name("r" * 400)) == MAX_KEY_LENGTH and mlflow_run_name("+ RSG | 10 | seed 0/0") == "+ RSG | 10 | seed 0/0"


# ------------------------------------------------------------------------------------------ in the store
def test_a_metric_name_mlflow_refuses_is_written_and_read_back(mlflow_store: str, capsys: pytest.CaptureFixture) -> None:
    """`ltsearch runs` and the UI's trials link find a run's objective under the key it was written with."""
    tracker = Tracker(TrackingConfig(), "exp")
    tracker.open_run("run", name="train run", find={"ltsearch.kind": "train", "ltsearch.dir": "/d"},
                     tags={"ltsearch.metric": "val/λ=1", "ltsearch.mode": "max"}, params={"augmenter.λ": 0.5})
    tracker.log_metrics("run", 0, {"train/loss": 1.0, "val/λ=1": 0.25})
    tracker.log_summary("run", 0, {"best/val/λ=1": 0.25})
    tracker.close_run("run", "FINISHED")
    assert tracker.close() == []
    (top,) = browse.latest(MlflowClient(mlflow_store), limit=5)
    assert top.objective == 0.25
    run = MlflowClient(mlflow_store).get_run(top.run_id)
    assert run.data.params == {"augmenter.lambda": "0.5"} and set(run.data.metrics) == {"train/loss", "val/lambda_eq_1", "best/val/lambda_eq_1"}
    assert json.loads(run.data.tags[TAG_NAMES]) == {"augmenter.λ": "augmenter.lambda", "val/λ=1": "val/lambda_eq_1",
                                                    "best/val/λ=1": "best/val/lambda_eq_1"}
    assert "orderByKey=metrics.%60best%2Fval%2Flambda_eq_1%60" in trials_url("http://h", "1", top.run_id, "val/λ=1", "max")
    said = capsys.readouterr().err
    assert said.count("changed to fit MLflow") == 1 and "'augmenter.λ' -> 'augmenter.lambda'" in said


@pytest.mark.slow
def test_an_ablation_with_a_papers_row_names_arrives_whole(ray_runtime, tmp_path: Path, mlflow_store: str, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "names.yaml"
    path.write_text(yaml.safe_dump(PAPER, sort_keys=False, allow_unicode=True))
    ablation = load_ablation(path)
    outcome = run_ablation(ablation, directory=str(tmp_path / "out"), stream=io.StringIO(), progress_interval_s=600)
    assert outcome.finished and [r.status for r in outcome.results] == ["completed"] * 4
    client = MlflowClient(mlflow_store)
    runs = client.search_runs([client.get_experiment_by_name("names").experiment_id])
    (parent,) = [r for r in runs if r.data.tags["ltsearch.kind"] == "ablation"]
    cells = [r for r in runs if r.data.tags["ltsearch.kind"] == "cell"]

    sent = record.flatten(parent_params(ablation))
    names = json.loads(parent.data.tags.get(TAG_NAMES, "{}"))
    assert len(parent.data.params) == len(sent), "a param of the parent run was lost"
    for key, value in sent.items():
        assert parent.data.params[names.get(key, key)] == str(value), key
    assert names["rows.+ RSG.augmenter.name"] == "rows.plus RSG.augmenter.name"
    assert names["rows.λ=0.5.loss.ldam.max_m"] == "rows.lambda_eq_0.5.loss.ldam.max_m"
    assert names["rows.Ours (full).loss.name"] == "rows.Ours _full_.loss.name"
    assert names["reference.+ RSG.10"] == "reference.plus RSG.10"
    assert "rows.w/o L_r.loss.name" not in names and parent.data.params["rows.w/o L_r.loss.name"] == "ce", "valid keys are kept"
    assert all(key != value for key, value in names.items()) and len(set(names.values())) == len(names)
    artifact = Path(client.download_artifacts(parent.info.run_id, NAMES_FILE, str(tmp_path / "names")))
    assert json.loads(artifact.read_text()) == names

    assert sorted(c.info.run_name for c in cells) == sorted(f"{row} | 10 | seed 0/0" for row in ROWS)
    for cell in cells:
        row = cell.data.tags["ltsearch.row"]
        assert cell.info.status == "FINISHED" and cell.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert cell.data.tags["ltsearch.column"] == "10" and "best/test/top1" in cell.data.metrics and TAG_NAMES not in cell.data.tags
        for key, value in ROWS[row].items():
            assert cell.data.params[key] == str(value), (row, key)
    said = capsys.readouterr().err
    assert said.count("changed to fit MLflow") == 1 and "'rows.+ RSG.augmenter.name' -> 'rows.plus RSG.augmenter.name'" in said
    assert "could not write" not in said
