"""All 15 MVTec AD classes x 3 seeds (45 runs): the main table, mean +- std over seeds.

  python -m launch.sweep --config=configs/mvtec.py --sweep=launch/sweeps/mvtec_seeds.py \
      --sweep_dir=runs/mvtec_seeds -- --config.dataset.root=/data/mvtec
"""
from launch.spec import product
from pbas_jax.data.builders import CLASSES


def get_sweep():
  return product(classes=list(CLASSES["mvtec"]), seeds=[0, 1, 2])
