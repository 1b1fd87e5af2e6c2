"""What the desktops take of each host: counts and summed sizes of the desktops in given
states, one grouped query for every host at once (placement, the hosts list).

Like every repository, this never commits.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from deskpool.store.models import Desktop, TemplateVersion


class HostUsageRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def desktop_counts(self, states: Collection[str]) -> dict[uuid.UUID, int]:
        """Desktops in one of ``states``, per host (hosts with none are left out)."""
        return {host_id: count for host_id, count in self._session.execute(
            select(Desktop.host_id, func.count()).where(Desktop.state.in_(list(states)))
            .group_by(Desktop.host_id))}

    def usage(self, states: Collection[str]) -> dict[uuid.UUID, tuple[int, int, int]]:
        """(vCPUs, memory in MiB, desktops) that desktops in one of ``states`` take, per host
        (hosts with none are left out)."""
        return {host_id: (vcpus or 0, memory or 0, count)
                for host_id, vcpus, memory, count in self._session.execute(
                    select(Desktop.host_id, func.sum(TemplateVersion.vcpus),
                           func.sum(TemplateVersion.memory_mib), func.count())
                    .join(TemplateVersion, TemplateVersion.id == Desktop.template_version_id)
                    .where(Desktop.state.in_(list(states))).group_by(Desktop.host_id))}
