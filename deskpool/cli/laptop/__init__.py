"""The laptop's side of offline desktops (issue 15): its directory, the broker's HTTP API,
resumable transfers and the local libvirt domain. A thin client: it talks HTTP to the
broker and never imports the store or the services (import-linter holds it to that)."""
