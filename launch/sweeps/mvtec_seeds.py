"""All 15 MVTec AD classes x 3 seeds: the main table, mean +- std over seeds.

One task per class (what changes the compiled program); its 3 seeds (`train.seed` 0, 1, 2) train
together as vmapped runs of the engine (`train.num_runs`), sharing one compilation and one feature
cache. 15 tasks, 45 result rows.

  python -m launch.sweep --config=configs/mvtec.py --sweep=launch/sweeps/mvtec_seeds.py \
      --sweep_dir=runs/mvtec_seeds -- --config.dataset.root=/data/mvtec
"""
from launch.spec import product
from pbas_jax.data.builders import CLASSES


def get_sweep():
  return product(classes=list(CLASSES["mvtec"]), **{"train.num_runs": [3]})
