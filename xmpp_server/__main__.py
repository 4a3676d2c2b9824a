from xmpp_server.cli import main

if __name__ == "__main__":  # not when multiprocessing's spawn re-imports it (STUN workers)
    raise SystemExit(main())
