"""Roaming profiles as the administrator and their users see them: size, generations, the
last write-back, sessions set aside, merge conflicts; reset (the old home kept as a
generation to roll back to), rollback, and a checksum verification of every committed
layer. Admin actions are audited."""

from __future__ import annotations

import builtins
import uuid
from dataclasses import dataclass
from datetime import datetime

from deskpool.domain.errors import NotFound
from deskpool.domain.profile_hosts import HoldState
from deskpool.services.audit import Actor, audit
from deskpool.services.context import ServiceContext
from deskpool.services.profiles import ProfileService, ProfileView


@dataclass(frozen=True, slots=True)
class LayerCopyView:
    """A profile layer on its way to a host, with its progress (``services.profile_copies``)."""

    user: str
    generation: int
    layer_id: uuid.UUID
    host: str
    bytes_done: int
    bytes_total: int
    copier: str | None
    updated_at: datetime | None


class ProfileAdmin:
    def __init__(self, ctx: ServiceContext, actor: Actor | None = None) -> None:
        self.ctx = ctx
        self.actor = actor
        self.profiles = ProfileService(ctx, ctx.settings.resolved_profile_dir)

    def list(self) -> list[ProfileView]:
        with self.ctx.uow(read_only=True) as uow:
            users = [profile.user for profile in uow.profiles.all()]
        return [self.profiles.describe(user) for user in users]

    def show(self, user: str) -> ProfileView:
        """``NotFound`` naming the user when they have no profile yet."""
        try:
            return self.profiles.describe(user)
        except NotFound:
            raise NotFound(f"{user} has no roaming profile yet (one is made at their first "
                           "logon to a pool with roaming profiles)") from None

    def reset(self, user: str) -> ProfileView:
        """A fresh home from the next logon on; the current one stays a generation that a
        rollback can return to while it is kept."""
        before = self.show(user)
        with self.ctx.uow(read_only=True) as uow:
            account = uow.linux_accounts.find(user)
            gid = uow.linux_accounts.gid_of(user)
        owner = None if account is None else (account[1], account[1] if gid is None else gid)
        after = self.profiles.reset(user, actor=self._who, owner=owner)
        audit(self.ctx, self.actor, "profile.reset", f"profile/{user}",
              f"reset the profile of {user}: generation {after.generation} is a fresh home",
              old={"generation": before.generation}, new={"generation": after.generation},
              user=user)
        return self.show(user)

    def rollback(self, user: str, generation: int) -> ProfileView:
        """The kept ``generation`` becomes the next one (``InvalidInput`` naming the kept
        ones for any other)."""
        before = self.show(user)
        after = self.profiles.rollback(user, generation, actor=self._who)
        audit(self.ctx, self.actor, "profile.rollback", f"profile/{user}",
              f"rolled the profile of {user} back to generation {generation} (now "
              f"generation {after.generation})", old={"generation": before.generation},
              new={"generation": after.generation, "from": generation}, user=user)
        return self.show(user)

    def verify(self, user: str) -> builtins.list[str]:
        """Read every committed layer of ``user``'s profile against the sha256 recorded
        when it was written: one sentence per layer that differs or cannot be read (each
        also an error event), ``[]`` when all match. Logon checks only the layers'
        metadata, so this is what finds flipped bits in their data."""
        self.show(user)  # NotFound naming the user
        return self.profiles.verify(user)

    def copies(self) -> builtins.list[LayerCopyView]:
        """Every copy of a profile layer between hosts in flight, oldest first."""
        with self.ctx.uow(read_only=True) as uow:
            hosts = {h.id: h.name for h in uow.hosts.list()}
            found = []
            for copy in uow.profile_holders.records(state=HoldState.COPYING):
                layer = uow.profiles.layer(copy.layer_id)
                found.append(LayerCopyView(
                    user=layer.user, generation=layer.generation, layer_id=layer.id,
                    host=hosts.get(copy.host_id, str(copy.host_id)),
                    bytes_done=copy.bytes_done, bytes_total=copy.bytes_total,
                    copier=copy.copier, updated_at=copy.updated_at))
            return found

    def held_on(self, user: str) -> dict[int, builtins.list[str]]:
        """Each committed generation of ``user`` -> the hosts holding its layer (empty: in
        the profile store every host reaches)."""
        self.show(user)
        with self.ctx.uow(read_only=True) as uow:
            hosts = {h.id: h.name for h in uow.hosts.list()}
            layers = {la.id: la.generation for la in uow.profiles.layers(user)
                      if la.state.value == "committed"}
            holders = uow.profile_holders.holders(list(layers))
        return {generation: sorted(hosts.get(h, str(h)) for h in holders.get(layer_id, ()))
                for layer_id, generation in sorted(layers.items(), key=lambda kv: kv[1])}

    def latest_on(self, user: str | None = None) -> dict[str, builtins.list[str]]:
        """Each user with a profile (or just ``user``) -> the hosts holding their latest
        generation's layer (empty: only the profile store every host reaches), in one read."""
        with self.ctx.uow(read_only=True) as uow:
            hosts = {h.id: h.name for h in uow.hosts.list()}
            profiles = uow.profiles.all() if user is None else [uow.profiles.get(user)]
            tops = {p.user: p.layer_id for p in profiles}
            holders = uow.profile_holders.holders([t for t in tops.values() if t is not None])
        return {user: sorted(hosts.get(h, str(h)) for h in holders.get(top, ()))
                if top is not None else [] for user, top in tops.items()}

    @property
    def _who(self) -> str:
        return self.actor.name if self.actor is not None else "system"
