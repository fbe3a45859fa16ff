"""A quick try of a cluster: one MPDD class, full PBAS and ABL alone (two compiled programs, so
two tasks), each with 3 seeds trained together (`train.num_runs`). Use with configs/mpdd.py:smoke.

  python -m launch.sweep --config=configs/mpdd.py:smoke --sweep=launch/sweeps/smoke.py \
      --sweep_dir=runs/smoke -- --config.dataset.root=$PBAS_DATA/mpdd
"""


def get_sweep():
  full = {"dataset.classes": "metal_plate", "train.num_runs": 3}
  abl_alone = {**full, "model.rbo": False, "model.scoring": "center_distance"}  # Table V
  return [full, abl_alone]
