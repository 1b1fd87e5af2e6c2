"""The Linux account a deskpool user signs in to on a desktop: its name, by one rule.

The rule (``linux_account_name``), applied in this order:

1. a directory name's domain part is dropped: ``alice@corp.example`` and ``CORP\\alice``
   both become ``alice`` (so one person has one account however the directory spells them);
2. the name is lower-cased;
3. every character outside ``[a-z0-9_-]`` (spaces, dots, path characters, accents) becomes
   ``_``;
4. the result must match ``^[a-z_][a-z0-9_-]{0,31}$`` (useradd's portable set: it may not
   start with a digit or ``-``, at most 32 characters), else the user is refused;
5. names of system accounts (``root``, ``daemon``, ``lightdm``, ``systemd-*``...: see
   ``SYSTEM_ACCOUNTS``) are refused; so is, in the guest, any existing account with a uid
   below 1000 (the session hook checks that, since only the guest knows its accounts).

Two deskpool users that map to the same account (``Alice`` and ``alice``, ``a.b`` and
``a_b``) are not merged: the first one to connect owns the account and the second is
refused (the store enforces it with a unique account name), never silently sharing a home.
"""

from __future__ import annotations

import re

from deskpool.domain.errors import InvalidInput

ACCOUNT_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
SYSTEM_ACCOUNTS = frozenset({
    "root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp",
    "proxy", "www-data", "backup", "list", "irc", "gnats", "nobody", "nogroup",
    "messagebus", "lightdm", "xrdp", "_apt", "sshd", "polkitd", "avahi", "colord",
    "pulse", "rtkit", "saned", "usbmux", "dnsmasq", "tss", "uuidd", "statd", "ntp",
    "_chrony", "geoclue", "speech-dispatcher", "deskpool", "operator", "adm", "admin",
    "sudo", "wheel", "shadow", "staff", "users", "audio", "video", "plugdev", "netdev",
})
SYSTEM_PREFIXES = ("systemd-",)
FIRST_UID = 10_000  # above any distribution's dynamic range and typical LDAP ranges' start


class AccountRefused(InvalidInput):
    """A user who cannot have a Linux account on a desktop: nothing is wrong with the desktop,
    so the broker gives it back instead of failing it."""


def linux_account_name(user_name: str) -> str:
    """The Linux account name for deskpool user ``user_name`` (see the module docstring);
    ``InvalidInput`` naming the user and why when there is none."""
    name = user_name.strip()
    if "\\" in name:
        name = name.rsplit("\\", 1)[1]
    if "@" in name:
        name = name.split("@", 1)[0]
    name = re.sub(r"[^a-z0-9_-]", "_", name.lower())
    if not ACCOUNT_RE.fullmatch(name):
        why = ("it is empty once its domain part is dropped" if not name else
               "it would be longer than 32 characters" if len(name) > 32 else
               f"{name!r} would start with {name[0]!r}, and a Linux account name must "
               "start with a letter or '_'")
        raise AccountRefused(f"user {user_name!r} cannot have a Linux account on a desktop: "
                           f"{why}; ask your administrator to rename the user")
    if name in SYSTEM_ACCOUNTS or name.startswith(SYSTEM_PREFIXES):
        raise AccountRefused(f"user {user_name!r} cannot have a Linux account on a desktop: "
                           f"{name!r} is the name of a system account; ask your "
                           "administrator to rename the user")
    return name
