"""`featstore precompute` and `featstore demo` from the command line: flags, aliases, environment."""

import json
import os
import subprocess
import sys
import time

from featstore import FeatureStore
from featstore.examples import make_image_tree

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, where toy_encoders.py is


def cli(*args, env=None, timeout=300):
    e = {**os.environ, "PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.run([sys.executable, "-m", "featstore.cli", *args], capture_output=True, text=True, env=e,
                          timeout=timeout)


def test_precompute_then_rerun_does_nothing(tmp_path):
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 6, size=40)
    r = cli("precompute", root, "--random-weights", "--num-workers", "0", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["written"] == 6 and s["encoder"]["random_weights"] and s["device"] == "cpu"
    assert FeatureStore(root, "vggt").contains(rels[0])
    r = cli("precompute", root, "--random-weights")
    assert r.returncode == 0 and "nothing to do" in r.stdout and "6 already valid" in r.stdout
    assert "single-frame use" in r.stdout  # --frames-per-set 1 says what its features are good for


def test_old_script_flags_and_environment(tmp_path):
    root = str(tmp_path / "data")
    make_image_tree(root, 6, size=40)
    r = cli("precompute", "--data_root", root, "--encoder", "toy_encoders:make_toy", "--batch_size", "2",
            "--start_idx", "0", "--end_idx", "4", "--skip_existing", "--model_path", "/models/janus", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["written"] == 4 and s["selected"] == 4
    manifest = json.load(open(os.path.join(root, "toy_cache_manifest.json")))
    assert manifest["model_path"] == "/models/janus"
    env = {"DATA_ROOT": root, "BATCH_SIZE": "3", "DEVICE": "cpu", "SKIP_EXISTING": "false"}
    r = cli("precompute", "--encoder", "toy_encoders:make_toy", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["written"] == 6  # SKIP_EXISTING=false recomputes everything


def test_dry_run_and_dir_layout(tmp_path):
    root = str(tmp_path / "data")
    make_image_tree(root, 4, size=40)
    cache = str(tmp_path / "cache")
    r = cli("precompute", root, "--encoder", "toy_encoders:make_toy", "--cache_dir", cache, "--dry-run")
    assert r.returncode == 0 and "dry run" in r.stdout and "4 to compute" in r.stdout
    assert not os.path.exists(os.path.join(cache, "toy"))
    r = cli("precompute", root, "--encoder", "toy_encoders:make_toy", "--cache-dir", cache, "--json")
    assert json.loads(r.stdout)["written"] == 4
    assert os.path.exists(os.path.join(cache, "toy", "manifest.json"))


def test_bad_weights_path_fails_fast_with_a_clear_message(tmp_path):
    root = str(tmp_path / "data")
    make_image_tree(root, 2, size=16)
    t0 = time.perf_counter()
    r = cli("precompute", root, "--vggt-model-path", str(tmp_path / "VGGT-1B"))
    assert r.returncode == 1 and "not found" in r.stderr and "VGGT-1B" in r.stderr
    assert "Traceback" not in r.stderr and time.perf_counter() - t0 < 30
    r = cli("precompute", root, env={"VGGT_MODEL_PATH": ""})
    assert r.returncode == 1 and "--vggt-model-path" in r.stderr


def test_no_images_and_failed_items_exit_1(tmp_path):
    (tmp_path / "empty").mkdir()
    r = cli("precompute", str(tmp_path / "empty"), "--random-weights")
    assert r.returncode == 1 and "no images found" in r.stderr
    root = str(tmp_path / "data")
    make_image_tree(root, 2, size=16)
    with open(os.path.join(root, "bad.png"), "wb") as f:
        f.write(b"garbage")
    r = cli("precompute", root, "--encoder", "toy_encoders:make_toy")
    assert r.returncode == 1 and "failed bad.png" in r.stdout


def test_demo_runs_the_whole_job(tmp_path):
    r = cli("demo", str(tmp_path / "demo"), "--images", "6", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["first_run"]["written"] == 6 and s["rerun_planned"] == 0 and s["after_edit_written"] == 1
    assert s["states"]["valid"] == 6
    assert s["training"]["samples"] == 6 and s["training"]["cached"] == 6
    r = cli("demo", str(tmp_path / "demo"))
    assert r.returncode == 1 and "not empty" in r.stderr


def test_ctrl_c_stops_cleanly_and_a_rerun_continues(tmp_path):
    import signal

    root = str(tmp_path / "data")
    rels = make_image_tree(root, 16, size=32)
    env = {**os.environ, "PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""), "TOY_DELAY": "0.2"}
    proc = subprocess.Popen([sys.executable, "-m", "featstore.cli", "precompute", root, "--encoder",
                             "toy_encoders:make_slow", "--batch-size", "2", "--num-workers", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            # A shell's background job inherits SIGINT as ignored (so would this
                            # child): give it the default disposition, as a terminal's Ctrl-C has.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while time.time() < deadline and not any(
            os.path.exists(os.path.join(root, r + ".toy.safetensors")) for r in rels):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "rerun continues" in err and "Traceback" not in err
    r = cli("precompute", root, "--encoder", "toy_encoders:make_toy", "--json")
    s = json.loads(r.stdout)
    assert s["skipped"] >= 1 and s["written"] + s["skipped"] == len(rels)


def test_bad_values_are_usage_errors_before_anything_loads(tmp_path):
    root = str(tmp_path / "data")
    make_image_tree(root, 2, size=16)
    for args in (["--shard", "x"], ["--shard", "3/2"], ["--batch-size", "0"], ["--frames-per-set", "0"],
                 ["--encoder", "nonsense"]):
        r = cli("precompute", root, "--random-weights", *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
    r = cli("precompute", root, "--random-weights", env={"BATCH_SIZE": "abc"})
    assert r.returncode == 2 and "BATCH_SIZE" in r.stderr
    r = cli("status", root, "--feature", "a/b")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = cli("precompute", root, "--random-weights", env={"SKIP_EXISTING": "ture"})  # not read as "no"
    assert r.returncode == 2 and "SKIP_EXISTING" in r.stderr
    for command in (["scan", root, "--threads", "-1"], ["demo", str(tmp_path / "demo"), "--images", "1"],
                    ["precompute", root, "--num-workers", "-1"]):
        r = cli(*command)
        assert r.returncode == 2 and "must be at least" in r.stderr and "Traceback" not in r.stderr, command
