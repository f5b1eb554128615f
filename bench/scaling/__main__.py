"""python -m bench.scaling: the calibrated scaling model (bench/scaling/main.py)."""

from bench.scaling.main import main

main()
