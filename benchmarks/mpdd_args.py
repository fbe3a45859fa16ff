"""The real-data flags the benchmarks share: where the MPDD class is."""
import argparse
import os


def add_mpdd_args(parser: argparse.ArgumentParser) -> None:
  """--root (the MPDD folder; default $PBAS_DATA/mpdd) and --class_name (default metal_plate)."""
  parser.add_argument("--root", default=os.path.join(os.environ.get("PBAS_DATA", "../shared/data"),
                                                     "mpdd"))
  parser.add_argument("--class_name", default="metal_plate")
