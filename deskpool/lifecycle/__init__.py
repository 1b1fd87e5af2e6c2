"""Desktop lifecycle: the state table and the services that move desktops through it."""
