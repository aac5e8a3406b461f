"""In-flight stage-1 runs are listed with their progress (`pipeline runs`, `pipeline info <run>`)."""
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.stage1.runinfo import describe, in_flight, run_progress
from pipeline.stage1.plan import resolve_config
from pipeline.stage1.train import train

from .conftest import tiny_dataset


def test_in_flight_run_progress_and_listing(tmp_path):
    ds = tiny_dataset()
    cfg = resolve_config(ds, epochs=5, batch_size=8, warmup_epochs=1, precision="fp32", seed=0, eval_every=2)
    train(ds, cfg, tmp_path / "run-a", "cpu", stop_after=3, log=lambda *a: None)
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "features.h5").write_bytes(b"")  # a finished run is not in flight
    p = run_progress(tmp_path / "run-a")
    assert (p["epoch"], p["epochs"], p["finished_training"], p["has_cache"]) == (3, 5, False, False)
    # the time left is the mean of the recorded epoch durations times the epochs left
    import torch
    secs = [r["seconds"] for r in torch.load(tmp_path / "run-a" / "checkpoint.pt", weights_only=False)["curve"]]
    assert abs(p["eta_seconds"] - 2 * sum(secs) / 3) < 1e-9
    assert p["last_test"]["epoch"] == 2  # epochs 1 and 3 were not evaluated (eval_every 2)
    assert [q["run"] for q in in_flight(tmp_path)] == ["run-a"]
    line = describe(p)
    assert "run-a: in flight, epoch 3/5 (60%)" in line and "left at" in line

    r = CliRunner().invoke(cli, ["runs", "--cache-root", str(tmp_path)])
    assert r.exit_code == 0 and "run-a: in flight, epoch 3/5" in r.output and "done: finished" in r.output
    r = CliRunner().invoke(cli, ["info", str(tmp_path / "run-a")])
    assert r.exit_code == 0 and "epoch 3/5" in r.output
    r = CliRunner().invoke(cli, ["runs", "--cache-root", str(tmp_path / "nope")])
    assert r.exit_code == 2 and r.output.startswith("Error:")


def test_info_json_of_a_finished_cache(tmp_path):
    import json
    from pipeline.synthetic import make_synthetic_cache
    (tmp_path / "r").mkdir()
    path = make_synthetic_cache(tmp_path / "r" / "features.h5")
    r = CliRunner().invoke(cli, ["info", "--json", str(path)])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    from pipeline.cache import read_cache
    c = read_cache(path)
    assert s["fingerprint"] == c.fingerprint and s["num_classes"] == c.num_classes
    assert s["shapes"]["plain/train"] == list(c.split("train")[0].shape)
    assert sum(s["groups"].values()) == c.num_classes and s["train_images"] == int(c.train_counts.sum())
    text = CliRunner().invoke(cli, ["info", str(path)]).output
    assert c.fingerprint in text and "classes" in text


def test_precision_history_uses_the_logs_one_based_epochs():
    """precision_segments hold the epochs done before each segment; a run resumed at 380/591 in fp32 trained
    epochs 1-380 in bf16 and 381-591 in fp32, as its log numbers them."""
    from pipeline.stage1.runinfo import precision_history
    assert precision_history([[0, "bf16"], [380, "fp32"]], 591) == "bf16 for epochs 1–380, fp32 for 381–591"
    assert (precision_history([[0, "fp32"], [2, "bf16"], [5, "fp32"]], 9)
            == "fp32 for epochs 1–2, bf16 for 3–5, fp32 for 6–9")
    assert precision_history([[0, "bf16"], [3, "fp32"]], None) == "bf16 for epochs 1–3, fp32 for 4 on"
