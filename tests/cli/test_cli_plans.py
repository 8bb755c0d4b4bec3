"""`featstore precompute` as a new user meets it: plans printed first, progress lines in log files,
dry runs without weights, honest counts of what a run replaces, usage errors of the command."""

import json
import os
import subprocess
import sys

from featstore.examples import make_image_tree

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, where toy_encoders.py is


def _env(extra=None):
    return {**os.environ, "PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra or {})}


def cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "featstore.cli", *args], capture_output=True, text=True,
                          env=_env(env), timeout=timeout)


def test_plan_is_printed_before_the_work_and_a_log_gets_progress_lines(tmp_path):
    root = str(tmp_path / "data")
    make_image_tree(root, 8, size=24)
    proc = subprocess.Popen([sys.executable, "-m", "featstore.cli", "precompute", root, "--encoder",
                             "toy_encoders:make_slow", "--batch-size", "1", "--num-workers", "0",
                             "--log-every", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env({"TOY_DELAY": "0.4"}))
    try:
        first = proc.stdout.readline()
        second = proc.stdout.readline()
        assert proc.poll() is None, "the plan came out only when the run ended"
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert first.startswith("featstore precompute: feature toy") and second.startswith("plan: ")
    assert proc.returncode == 0, err
    lines = [line for line in err.splitlines() if line.startswith("precompute toy:")]
    assert len(lines) >= 2, err  # periodic lines while it runs, then the last one
    assert "8/8" in lines[-1] and "failed" in lines[-1] and "/s" in lines[-1]
    assert any("ETA" in line for line in lines[:-1])
    assert "\r" not in err  # lines, not a bar redrawn in place
    assert "done: 8 written" in out


def test_log_every_zero_turns_the_lines_off(tmp_path):
    root = str(tmp_path / "data")
    make_image_tree(root, 3, size=24)
    r = cli("precompute", root, "--encoder", "toy_encoders:make_toy", "--num-workers", "0", "--log-every", "0")
    assert r.returncode == 0 and "precompute toy:" not in r.stderr
    r = cli("precompute", root, "--encoder", "toy_encoders:make_toy", "--overwrite", "--num-workers", "0",
            env={"FEATSTORE_LOG_EVERY": "soon"})
    assert r.returncode == 2 and "FEATSTORE_LOG_EVERY" in r.stderr


def test_dry_run_needs_no_weights(tmp_path):
    root = str(tmp_path / "data")
    make_image_tree(root, 3, size=24)
    r = cli("precompute", root, "--dry-run", env={"VGGT_MODEL_PATH": ""})
    assert r.returncode == 0, r.stderr
    assert "3 to compute" in r.stdout and "weights not given" in r.stdout and "not checked" in r.stdout
    r = cli("precompute", root, "--dry-run", "--vggt-model-path", str(tmp_path / "nowhere.pt"))
    assert r.returncode == 1 and "nowhere.pt" in r.stderr  # a path given is still checked
    r = cli("precompute", root, env={"VGGT_MODEL_PATH": ""})
    assert r.returncode == 1 and "--vggt-model-path" in r.stderr  # a real run still needs them


def test_a_missing_weights_path_names_where_it_came_from(tmp_path):
    root = str(tmp_path / "data")
    make_image_tree(root, 2, size=16)
    missing = str(tmp_path / "VGGT-1B")
    r = cli("precompute", root, "--vggt-model-path", missing, env={"VGGT_MODEL_PATH": ""})
    assert r.returncode == 1 and f"--vggt-model-path {missing}" in r.stderr, r.stderr
    assert "VGGT_MODEL_PATH" not in r.stderr
    r = cli("precompute", root, env={"VGGT_MODEL_PATH": missing})
    assert r.returncode == 1 and f"$VGGT_MODEL_PATH={missing}" in r.stderr, r.stderr


def test_missing_weights_are_reported_before_torch_is_imported(tmp_path):
    root = str(tmp_path / "data")
    make_image_tree(root, 2, size=16)
    code = ("import sys\nfrom featstore.cli import main\n"
            f"rc = main(['precompute', {root!r}])\n"
            "print(rc, 'torch' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "VGGT_MODEL_PATH"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.stdout.split() == ["1", "False"], r.stdout + r.stderr  # the first second, not 10 s of imports
    assert "--random-weights" in r.stderr and "facebook/VGGT-1B" in r.stderr


def test_a_files_from_entry_that_does_not_exist_fails_the_run(tmp_path):
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 3, size=24)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{rels[0]}\nscene9/gone.jpg\n")
    r = cli("precompute", root, "--encoder", "toy_encoders:make_toy", "--num-workers", "0",
            "--files-from", str(listing))
    assert r.returncode == 1, r.stderr
    assert "scene9/gone.jpg" in r.stderr and "1 written" in r.stdout
    assert str(listing) in r.stderr  # the list to fix


def test_a_changed_configuration_says_what_it_replaces(tmp_path):
    root = str(tmp_path / "data")
    make_image_tree(root, 4, size=24)
    assert cli("precompute", root, "--random-weights", "--num-workers", "0").returncode == 0
    r = cli("precompute", root, "--random-weights", "--layers", "-1", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "0 already valid, 4 to compute" in r.stdout
    assert "4 entries of another encoder configuration" in r.stdout and "will be replaced" in r.stdout
    r = cli("precompute", root, "--random-weights", "--layers", "-1", "--dry-run", "--json")
    assert json.loads(r.stdout)["replaced"] == 4
    r = cli("precompute", root, "--random-weights", "--layers", "-1", "--num-workers", "0")
    assert r.returncode == 0 and "4 entries of another encoder configuration" in r.stdout
    assert "were replaced" in r.stdout


def test_a_bad_shard_is_the_commands_usage_error(tmp_path):
    root = str(tmp_path / "data")
    make_image_tree(root, 2, size=16)
    r = cli("precompute", root, "--shard", "2/2")
    assert r.returncode == 2 and r.stderr.startswith("usage: featstore precompute"), r.stderr
    assert "featstore precompute: error: --shard '2/2'" in r.stderr


def test_status_defaults_to_the_only_feature(tmp_path):
    root = str(tmp_path / "data")
    make_image_tree(root, 3, size=24)
    assert cli("precompute", root, "--encoder", "toy_encoders:make_toy", "--num-workers", "0").returncode == 0
    r = cli("status", root)
    assert r.returncode == 0, r.stderr
    assert "feature toy" in r.stdout and "valid" in r.stdout
    assert "--feature toy" in r.stderr  # says which it chose
    assert cli("precompute", root, "--encoder", "toy_encoders:make_module", "--feature", "conv",
               "--num-workers", "0").returncode == 0
    r = cli("status", root)
    assert r.returncode == 2 and "--feature" in r.stderr and "conv" in r.stderr and "toy" in r.stderr


def test_the_size_estimate_comes_from_written_entries(tmp_path):
    root = str(tmp_path / "data")
    rels = make_image_tree(root, 6, size=24)
    assert cli("precompute", root, "--random-weights", "--num-workers", "0", "--end-idx", "3").returncode == 0
    sizes = [os.path.getsize(os.path.join(root, f"{rel}.vggt.safetensors")) for rel in rels[:3]]
    r = cli("precompute", root, "--random-weights", "--dry-run", "--json")
    s = json.loads(r.stdout)
    assert s["estimated_bytes"] == 3 * int(sum(sizes) / 3) and s["estimate_from"] == "entries"
    r = cli("precompute", root, "--random-weights", "--dry-run")
    assert "mean size of the 3 entries already written" in r.stdout


def test_the_estimate_says_how_many_of_the_written_entries_it_sampled(tmp_path):
    root = str(tmp_path / "data")
    make_image_tree(root, 20, size=16)
    assert cli("precompute", root, "--random-weights", "--num-workers", "0", "--end-idx", "18").returncode == 0
    r = cli("precompute", root, "--random-weights", "--dry-run")
    assert "mean size of 16 of the 18 entries already written" in r.stdout, r.stdout
