"""The web portal and admin pages: server-rendered HTML shells whose scripts call the REST API."""
