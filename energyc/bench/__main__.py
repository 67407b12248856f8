"""``python -m energyc.bench --serve-probes OPTIONS``: the probe server of ``energyc bench``
(:mod:`energyc.bench.isolation`); the benchmark itself is run as ``energyc bench FILE``."""

import sys

from energyc.bench.isolation import _serve_probes

if len(sys.argv) == 3 and sys.argv[1] == "--serve-probes":
    sys.exit(_serve_probes(sys.argv[2]))
sys.exit("energyc.bench is run as `energyc bench FILE`")
