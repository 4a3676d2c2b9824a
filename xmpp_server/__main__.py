from xmpp_server.cli import main

raise SystemExit(main())
