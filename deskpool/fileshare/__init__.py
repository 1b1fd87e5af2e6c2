"""deskpool's file server for redirected folders (Samba); see ``samba``."""
