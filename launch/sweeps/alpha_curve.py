"""The anomaly degree alpha (`model.k`, Eq. 7) on every MVTec AD class, one seed (paper Fig. 13).

One task per class; its six alphas train together as vmapped runs of the engine
(`train.k_values`: alpha is a traced value, so they share one compilation and one feature cache).
The reference code uses 0.25, the paper's text 0.3; aggregate gives one mean row per alpha.
15 tasks, 90 result rows.

  python -m launch.sweep --config=configs/mvtec.py --sweep=launch/sweeps/alpha_curve.py \
      --sweep_dir=runs/alpha_curve -- --config.dataset.root=/data/mvtec
"""
from launch.spec import product
from pbas_jax.data.builders import CLASSES

ALPHAS = (0.1, 0.2, 0.25, 0.3, 0.4, 0.5)


def get_sweep():
  return product(classes=list(CLASSES["mvtec"]), **{"train.k_values": [ALPHAS]})
