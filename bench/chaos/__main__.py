"""python -m bench.chaos: the chaos soak (bench/chaos/soak.py); with --service, the served
API's soak (bench/chaos/service_soak.py), which exits 1 when a target is missed."""

import sys

if "--service" in sys.argv[1:]:
    from bench.chaos.service_soak import main as service_main

    result = service_main([a for a in sys.argv[1:] if a != "--service"])
    sys.exit(0 if result["ok"] else 1)
else:
    from bench.chaos.soak import main

    main()
