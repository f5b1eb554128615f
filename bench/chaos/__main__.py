"""python -m bench.chaos: the chaos soak (bench/chaos/soak.py)."""

from bench.chaos.soak import main

main()
