from wsproxy.cli import main

raise SystemExit(main())
