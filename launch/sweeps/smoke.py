"""Three quick tasks (one MPDD class x 3 seeds) to try a cluster: use with configs/mpdd.py:smoke.

  python -m launch.sweep --config=configs/mpdd.py:smoke --sweep=launch/sweeps/smoke.py \
      --sweep_dir=runs/smoke -- --config.dataset.root=$PBAS_DATA/mpdd
"""
from launch.spec import product


def get_sweep():
  return product(classes=["metal_plate"], seeds=[0, 1, 2])
