"""The service layer: hosts, templates, the desktop factory and pools, over drivers and store."""
