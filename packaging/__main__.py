from edrv_auth import main

raise SystemExit(main())
