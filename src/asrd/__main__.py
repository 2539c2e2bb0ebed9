from asrd.cli import main

raise SystemExit(main())
