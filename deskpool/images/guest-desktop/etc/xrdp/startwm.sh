#!/bin/sh
# deskpool desktop flavor: what xrdp's session manager runs once a user signed in over RDP:
# the user's own Xfce (deskpool's lean start), on a D-Bus session bus of its own. The user's
# console session may be running at the same time on the user's systemd bus, and two Xfce
# sessions on one bus fight over their names (the panel's, the session manager's).
[ -r /etc/profile ] && . /etc/profile
[ -r "$HOME/.profile" ] && . "$HOME/.profile"
exec dbus-run-session -- /usr/lib/deskpool/xfce-session
