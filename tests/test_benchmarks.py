"""The accelerator script `benchmarks/device.py` keeps working: its --quick run on the CPU."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _device_benchmark(*flags: str) -> tuple[list[str], dict]:
  """Runs `python benchmarks/device.py --quick *flags` as a user would (one host device); returns
  its stdout lines and its last line as JSON."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
  run = subprocess.run([sys.executable, "benchmarks/device.py", "--quick", *flags], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  lines = run.stdout.strip().splitlines()
  return lines, json.loads(lines[-1])


@pytest.mark.slow
def test_device_benchmark_quick():
  lines, result = _device_benchmark()
  assert lines[0].startswith("start: ") and "load average" in lines[0]
  assert lines[-2].startswith("end: ") and "load average" in lines[-2]
  assert (result["benchmark"], result["quick"], result["backbone"], result["devices"]) == (
      "device", True, "resnet18", 1)
  assert result["images_source"] == "random" and result["skipped"] == []
  assert [(e["runs"], e["compute_dtype"]) for e in result["epoch"]] == [
      (1, "float32"), (1, "bfloat16"), (8, "float32"), (8, "bfloat16")]
  for e in result["epoch"]:
    assert e["epoch_s"] > 0 and e["compile_s"] > 0 and e["first_epoch_s"] > 0
    assert e["epoch_s_per_run"] == pytest.approx(e["epoch_s"] / e["runs"], abs=1e-4)  # rounding
    assert e["steps_per_epoch"] == -(-result["train_images"] // result["batch_size"])
  for phase in ("extraction", "inference"):
    assert result[phase]["images_per_s"] > 0 and result[phase]["compile_s"] > 0
  inference = result["inference"]
  assert inference["total_s"] == pytest.approx(
      inference["extraction_s"] + inference["scoring_s"], abs=2e-4)
  # The CPU backend reports no device memory: 'n/a', null in the JSON.
  assert result["backend"] == "cpu" and result["peak_bytes"] is None
  assert "peak device memory n/a" in "\n".join(lines)


@pytest.mark.slow
def test_device_benchmark_skips_phases_past_its_budget():
  lines, result = _device_benchmark("--budget_s=0")
  assert result["extraction"]["images_per_s"] > 0  # the first phase always runs
  assert result["epoch"] == [] and result["inference"] is None
  assert result["skipped"] == ["epoch R=1 float32", "epoch R=1 bfloat16", "epoch R=8 float32",
                               "epoch R=8 bfloat16", "inference"]
  assert "skipped (past --budget_s=0 s or not asked for): inference" in lines
