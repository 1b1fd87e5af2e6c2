"""The reconciler: keeps hosts, pools and desktops in line with the database."""
